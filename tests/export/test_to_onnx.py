"""export/to_onnx.py, the command line: bad input gives one line and a non-zero exit, and nothing is lost."""
from __future__ import annotations

from export import to_onnx
from movq_deploy.models.checkpoint import save_checkpoint


def _cli(capsys, *argv):
    code = to_onnx.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def test_cli_bad_inputs_give_one_line_and_a_nonzero_exit(ckpt, tmp_path, capsys, tiny_models):
    code, err = _cli(capsys, tmp_path / "missing.pt", "--out", tmp_path / "e")
    assert code == 1 and "missing.pt does not exist" in err and "\n" not in err

    foreign = tmp_path / "notes.pt"
    foreign.write_text("hello")
    code, err = _cli(capsys, foreign, "--out", tmp_path / "e")
    assert code == 1 and "notes.pt" in err and "\n" not in err

    movq, _ = tiny_models(num_classes=0)
    stage1 = save_checkpoint(tmp_path / "stage1.pt", tokenizer_config=movq.config.to_dict(),
                             tokenizer=movq.state_dict())
    code, err = _cli(capsys, stage1, "--out", tmp_path / "e")
    assert code == 1 and "holds no prior" in err and "\n" not in err

    code, err = _cli(capsys, ckpt, "--out", tmp_path / "e", "--guidance-scale", "-1")
    assert code == 1 and "guidance_scale must be >= 0" in err and "\n" not in err
    movq, prior = tiny_models(num_classes=0)
    unconditional = save_checkpoint(tmp_path / "unconditional.pt", tokenizer_config=movq.config.to_dict(),
                                    tokenizer=movq.state_dict(), prior_config=prior.config.to_dict(),
                                    prior=prior.state_dict())
    code, err = _cli(capsys, unconditional, "--out", tmp_path / "e", "--guidance-scale", "2")
    assert code == 1 and "needs a class-conditional prior" in err and "\n" not in err

    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "thesis.tex").write_text("do not delete")
    code, err = _cli(capsys, ckpt, "--out", precious)
    assert code == 1 and "refusing to replace" in err and (precious / "thesis.tex").exists()
    assert not (tmp_path / "e").exists()
