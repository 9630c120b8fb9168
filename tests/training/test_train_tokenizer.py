"""Stage 1 training: a few steps write ckpt/metrics/grid, --resume continues the same run, errors are one line."""
import json

import pytest
import torch
from PIL import Image

import movq_deploy.training.tokenizer as tokenizer
from movq_deploy.training import common
from movq_deploy.models.checkpoint import load_checkpoint, load_models
from movq_deploy.training.perceptual import VGG16_LAYOUT, load_perceptual


def args_for(out, *extra):
    return tokenizer.build_parser().parse_args(
        ["--out", str(out), "--steps", "4", "--batch-size", "2", "--disc-start", "2", "--restart-dead-every", "2",
         "--log-every", "2", "--eval-every", "2", "--save-every", "2", "--quiet", "--device", "cpu", *extra])


def test_a_few_steps_write_every_artifact(tmp_path):
    result = tokenizer.train(args_for(tmp_path))
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    record = ckpt["record"]["tokenizer"]
    assert record["step"] == 4 and record["eval"]["step"] == 4 and record["disc_start"] == 2
    assert record["data"]["source"] == "skimage.data" and len(ckpt["class_names"]) == 8
    movq, prior, _ = load_models(tmp_path / "ckpt.pt")
    assert prior is None
    for name, value in result["model"].state_dict().items():
        assert torch.equal(movq.state_dict()[name], value), name

    lines = [json.loads(line) for line in (tmp_path / "metrics_tokenizer.jsonl").read_text().splitlines()]
    train_lines = [r for r in lines if "loss" in r]
    assert [r["step"] for r in train_lines] == [2, 4]
    assert train_lines[0]["d_loss"] == 0 and train_lines[1]["d_loss"] > 0  # the discriminator starts at step 2
    assert all(0 < r["perplexity"] <= 512 and r["psnr"] > 0 for r in train_lines)
    assert [r["step"] for r in lines if "eval_psnr" in r] == [2, 4]
    assert Image.open(tmp_path / "reconstructions.png").size == (8 * 64, 4 * 64)  # 2 pairs of 8-wide rows
    assert (tmp_path / tokenizer.RESUME_FILE).is_file()
    assert result["eval"]["psnr"] > 5


def test_resume_continues_the_interrupted_run(tmp_path, monkeypatch):
    fast = ("--eval-every", "4")
    straight = tokenizer.train(args_for(tmp_path / "straight", *fast))["model"].state_dict()

    original = common.warmup_cosine

    def interrupted(step, *rest):
        if step == 2:  # after the step-2 save: like a kill between steps
            raise KeyboardInterrupt
        return original(step, *rest)

    monkeypatch.setattr(common, "warmup_cosine", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenizer.train(args_for(tmp_path / "cut", *fast))
    monkeypatch.setattr(common, "warmup_cosine", original)
    assert load_checkpoint(tmp_path / "cut" / "ckpt.pt")["record"]["tokenizer"]["step"] == 2
    resumed = tokenizer.train(args_for(tmp_path / "cut", "--resume", *fast))["model"].state_dict()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    log = (tmp_path / "cut" / "metrics_tokenizer.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in log]
    assert steps == [2, 4, 4]  # the log reads as one run


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        tokenizer.main(["--out", str(tmp_path), "--resume", "--quiet"])
    assert str(info.value).startswith("error: --resume: no resume file") and "\n" not in str(info.value)
    (tmp_path / tokenizer.RESUME_FILE).write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(SystemExit) as info:
        tokenizer.main(["--out", str(tmp_path), "--resume", "--quiet"])
    assert "corrupt or truncated" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(SystemExit) as info:
        tokenizer.main(["--data", str(tmp_path / "nowhere"), "--out", str(tmp_path), "--quiet"])
    assert "does not exist" in str(info.value)


def test_perceptual_loss_uses_local_weights_only(tmp_path):
    loss, notice = load_perceptual(tmp_path / "absent.pth")
    assert loss is None and "nothing is downloaded" in notice

    generator = torch.Generator().manual_seed(0)
    state, index, channels = {}, 0, 3
    for item in VGG16_LAYOUT:  # random weights in torchvision's vgg16 layout
        if item == "M":
            index += 1
            continue
        state[f"features.{index}.weight"] = torch.randn(item, channels, 3, 3, generator=generator) * 0.1
        state[f"features.{index}.bias"] = torch.zeros(item)
        index, channels = index + 2, item
    torch.save(state, tmp_path / "vgg16.pth")
    loss, notice = load_perceptual(tmp_path / "vgg16.pth")
    assert "perceptual loss on" in notice
    x = torch.rand(2, 3, 32, 32, generator=generator) * 2 - 1
    y = (x + 0.3 * torch.randn(2, 3, 32, 32, generator=generator)).requires_grad_()
    assert float(loss(x, x)) == 0.0
    value = loss(y, x)
    value.backward()
    assert float(value.detach()) > 0 and y.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in loss.parameters())
