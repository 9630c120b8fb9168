"""ckpt.pt: round trip of both stages, weights_only loading, atomic writes, one-line errors for bad files."""
import pytest
import torch

from movq_deploy.models.checkpoint import FORMAT, load_checkpoint, load_models, save_checkpoint
from movq_deploy.models.movq import MoVQ, MoVQConfig
from movq_deploy.models.prior import MaskGITPrior, PriorConfig


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    movq_config = MoVQConfig.preset("tiny")
    prior_config = PriorConfig.preset("tiny", movq_config, num_classes=2)
    return MoVQ(movq_config), MaskGITPrior(prior_config)


def save_both(path, movq, prior):
    return save_checkpoint(path, tokenizer_config=movq.config.to_dict(), tokenizer=movq.state_dict(),
                           prior_config=prior.config.to_dict(), prior=prior.state_dict(), class_names=["a", "b"],
                           record={"tokenizer": {"step": 3}})


def test_round_trip_both_stages(tmp_path, models):
    movq, prior = models
    path = save_both(tmp_path / "ckpt.pt", movq, prior)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # no temporary file left behind
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["format"] == FORMAT and raw["format_version"] == 1 and raw["class_names"] == ["a", "b"]

    movq2, prior2, ckpt = load_models(path)
    assert not movq2.training and not prior2.training
    assert ckpt["record"] == {"tokenizer": {"step": 3}}
    movq.eval(), prior.eval()
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert torch.equal(movq.encode(x), movq2.encode(x))
        assert torch.equal(movq.reconstruct(x), movq2.reconstruct(x))
        tokens = torch.randint(0, prior.config.codebook_size + 1, (2, prior.config.num_slots))
        labels = torch.tensor([0, 1])
        assert torch.equal(prior(tokens, labels), prior2(tokens, labels))


def test_stage_one_only_has_no_prior(tmp_path, models):
    movq, _ = models
    path = save_checkpoint(tmp_path / "ckpt.pt", tokenizer_config=movq.config.to_dict(), tokenizer=movq.state_dict())
    movq2, prior2, ckpt = load_models(path)
    assert prior2 is None and "prior" not in ckpt and ckpt["record"] == {}


def test_tokenizer_only_load_skips_the_prior(tmp_path, models):
    movq, prior = models
    _, prior2, ckpt = load_models(save_both(tmp_path / "ckpt.pt", movq, prior), with_prior=False)
    assert prior2 is None and "prior" in ckpt


def test_save_rejects_incomplete_parts(tmp_path, models):
    movq, prior = models
    with pytest.raises(ValueError, match="prior_config"):
        save_checkpoint(tmp_path / "c.pt", tokenizer_config=movq.config.to_dict(), tokenizer=movq.state_dict(),
                        prior=prior.state_dict())
    with pytest.raises(ValueError, match="tokenizer"):
        save_checkpoint(tmp_path / "c.pt", tokenizer_config=movq.config.to_dict())
    with pytest.raises(ValueError, match="unknown"):
        save_checkpoint(tmp_path / "c.pt", tokenizer_config={}, tokenizer={}, optimizer={})


def one_line_error(path, kind=ValueError) -> str:
    with pytest.raises(kind) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    return message


def test_truncated_file(tmp_path, models):
    movq, prior = models
    good = save_both(tmp_path / "good.pt", movq, prior).read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(good[: len(good) // 2])
    assert "truncated" in one_line_error(bad)


def test_corrupt_file(tmp_path):
    bad = tmp_path / "corrupt.pt"
    bad.write_bytes(b"\x00garbage" * 1000)
    assert "not a torch checkpoint" in one_line_error(bad)


def test_foreign_file(tmp_path):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    assert "not a movq-deploy checkpoint" in one_line_error(foreign)
    torch.save([1, 2, 3], foreign)
    assert "not a movq-deploy checkpoint" in one_line_error(foreign)


def test_other_format_version_and_missing_file(tmp_path, models):
    movq, _ = models
    path = tmp_path / "v2.pt"
    torch.save({"format": FORMAT, "format_version": 2, "tokenizer_config": {}, "tokenizer": {}}, path)
    assert "version 2" in one_line_error(path)
    one_line_error(tmp_path / "absent.pt", FileNotFoundError)


def test_weights_that_do_not_fit_the_config(tmp_path, models):
    movq, _ = models
    state = movq.state_dict()
    state.pop("quant_conv.weight")
    path = save_checkpoint(tmp_path / "c.pt", tokenizer_config=movq.config.to_dict(), tokenizer=state)
    with pytest.raises(ValueError, match="do not match"):
        load_models(path)
