"""Stage 2 training: MaskGIT masking, both stages in ckpt.pt, accuracy reported, --resume continues the run."""
import json
import math

import pytest
import torch

import movq_deploy.training.prior as prior_train
from movq_deploy.training import common
from movq_deploy.models.checkpoint import load_checkpoint, load_models, save_checkpoint
from movq_deploy.models.movq import MoVQ, MoVQConfig


def test_masking_follows_the_maskgit_schedule():
    batch, num_slots, mask_id, c = 4000, 256, 512, 4
    tokens = torch.randint(0, mask_id, (batch, num_slots))
    inputs, masked = prior_train.mask_tokens(tokens, mask_id, torch.Generator().manual_seed(0))
    assert torch.equal(inputs[masked], torch.full_like(inputs[masked], mask_id))
    assert torch.equal(inputs[~masked], tokens[~masked])
    counts = masked.sum(1)
    assert counts.min() >= 1  # at least one slot per sample
    ratio = counts.float() / num_slots
    # ratio = cos(pi/2 r), r ~ U(0,1]: mean 2/pi, P(ratio <= 1/2) = P(r >= 2/3) = 1/3
    assert abs(ratio.mean() - 2 / math.pi) < 0.02
    assert abs((ratio <= 0.5).float().mean() - 1 / 3) < 0.03
    # Slots, not positions, are the mask unit: the c channels of a position are masked independently.
    per_position = masked.reshape(batch, num_slots // c, c)
    partial = (per_position.any(-1) & ~per_position.all(-1)).float().mean()
    assert partial > 0.2
    rates = per_position.float().mean((0, 1))
    assert (rates - rates.mean()).abs().max() < 0.01  # no channel favoured
    # Given a sample's masked share f, two channels of one position are both masked with probability ~f^2.
    f = ratio[:, None]
    both = (per_position[..., 0] & per_position[..., 1]).float()
    assert abs(both.mean() - (f ** 2).mean()) < 0.01


def test_at_least_one_slot_even_when_r_is_one():
    tokens = torch.zeros(64, 8, dtype=torch.long)
    for seed in range(20):
        _, masked = prior_train.mask_tokens(tokens, 9, torch.Generator().manual_seed(seed))
        assert (masked.sum(1) >= 1).all()


@pytest.fixture(scope="module")
def tokenizer_ckpt(tmp_path_factory):
    """A stage-1 checkpoint (random tiny tokenizer) trained 'on' the embedded data."""
    path = tmp_path_factory.mktemp("stage1") / "ckpt.pt"
    torch.manual_seed(0)
    movq = MoVQ(MoVQConfig.preset("tiny"))
    save_checkpoint(path, tokenizer_config=movq.config.to_dict(), tokenizer=movq.state_dict(),
                    record={"tokenizer": {"step": 0, "data": {"source": "skimage.data"}}})
    return path


def args_for(ckpt, out, *extra):
    return prior_train.build_parser().parse_args(
        ["--ckpt", str(ckpt), "--out", str(out), "--steps", "4", "--batch-size", "4", "--num-crops", "16",
         "--log-every", "2", "--eval-every", "4", "--save-every", "2", "--quiet", "--device", "cpu", *extra])


def test_prior_training_writes_both_stages(tmp_path, tokenizer_ckpt):
    result = prior_train.train(args_for(tokenizer_ckpt, tmp_path / "ckpt.pt"))
    movq, prior, ckpt = load_models(tmp_path / "ckpt.pt")
    assert prior is not None and prior.config.num_classes == 8  # conditional: one class per embedded photo
    assert prior.config.grid == movq.config.grid and prior.config.codebook_size == movq.config.codebook_size
    assert torch.equal(ckpt["tokenizer"]["quant_conv.weight"],
                       load_checkpoint(tokenizer_ckpt)["tokenizer"]["quant_conv.weight"])  # tokenizer untouched
    record = ckpt["record"]
    assert record["tokenizer"]["step"] == 0 and record["prior"]["step"] == 4
    accuracy = record["prior"]["masked_accuracy"]
    assert 0 <= accuracy["start"] < 0.05 and 0 <= accuracy["end"] <= 1 and accuracy["end_step"] == 4
    assert accuracy == result["accuracy"]
    lines = [json.loads(line) for line in (tmp_path / "metrics_prior.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 4] and "eval_masked_accuracy" in lines[-1]
    assert (tmp_path / prior_train.CACHE_FILE).is_file()


def test_unconditional_flag(tmp_path, tokenizer_ckpt):
    prior_train.train(args_for(tokenizer_ckpt, tmp_path / "ckpt.pt", "--unconditional", "--steps", "1"))
    _, prior, _ = load_models(tmp_path / "ckpt.pt")
    assert prior.config.num_classes == 0


def test_resume_continues_the_interrupted_run(tmp_path, tokenizer_ckpt, monkeypatch):
    straight = prior_train.train(args_for(tokenizer_ckpt, tmp_path / "a" / "ckpt.pt"))["prior"].state_dict()
    original = common.warmup_cosine

    def interrupted(step, *rest):
        if step == 2:
            raise KeyboardInterrupt
        return original(step, *rest)

    monkeypatch.setattr(common, "warmup_cosine", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prior_train.train(args_for(tokenizer_ckpt, tmp_path / "b" / "ckpt.pt"))
    monkeypatch.setattr(common, "warmup_cosine", original)
    resumed = prior_train.train(args_for(tokenizer_ckpt, tmp_path / "b" / "ckpt.pt", "--resume"))
    for name, value in straight.items():
        assert torch.equal(value, resumed["prior"].state_dict()[name]), name
    assert "start" in resumed["accuracy"]


def test_bad_tokenizer_checkpoint_is_one_line(tmp_path):
    bad = tmp_path / "ckpt.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(SystemExit) as info:
        prior_train.main(["--ckpt", str(bad), "--quiet"])
    assert str(info.value).startswith("error: ") and "\n" not in str(info.value)
    config = MoVQConfig.preset("tiny")
    state = MoVQ(config).state_dict()
    state.pop("quant_conv.weight")  # weights that do not fit their config
    save_checkpoint(bad, tokenizer_config=config.to_dict(), tokenizer=state)
    with pytest.raises(SystemExit) as info:
        prior_train.main(["--ckpt", str(bad), "--quiet"])
    assert "do not match" in str(info.value) and "\n" not in str(info.value)


def test_paper_size_encoding_takes_batches_from_the_budget():
    """The paper tokenizer at 256x256 (one crop costs ~200 MB of activations): a budget of one and a half crops
    encodes one at a time, a larger one several per call, and the tokens are those of one batch of all."""
    from movq_deploy.memory import MemoryBudget

    torch.manual_seed(0)
    movq = MoVQ(MoVQConfig.preset("paper-f16")).eval()
    crops = torch.rand(3, 3, 256, 256) * 2 - 1
    one_and_a_half = prior_train.encode_batch(movq, MemoryBudget(300 << 20, "test"))
    several = prior_train.encode_batch(movq, MemoryBudget(1 << 30, "test"))
    assert one_and_a_half == 1 and several >= 3
    with torch.no_grad():
        together = movq.encode(crops).flatten(1)
    one_at_a_time, _ = prior_train.encode_all(movq, ((crops[i:i + 1], torch.zeros(1)) for i in range(3)))
    assert torch.equal(one_at_a_time, together)
    with pytest.raises(MemoryError, match=r"encoding 256x256 crops needs .* MB for one item, more than the memory "
                                          r"budget of 100 MB \(test\)"):
        prior_train.encode_batch(movq, MemoryBudget(100 << 20, "test"))


def test_a_step_that_cannot_fit_is_refused_before_it_starts(tokenizer_ckpt, tmp_path, monkeypatch):
    """On a machine with 1 MB available (the loops' own budget given), one line before the first step."""
    from movq_deploy import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
    with pytest.raises(SystemExit, match=r"error: a training step of the tiny prior at --batch-size 4 needs about "
                                         r".* MB, but only 1 MB is available; a step at --batch-size 1 needs"):
        prior_train.main(["--ckpt", str(tokenizer_ckpt), "--out", str(tmp_path / "ckpt.pt"), "--steps", "1",
                          "--batch-size", "4", "--num-crops", "8", "--quiet", "--device", "cpu",
                          "--memory-budget", "1G"])
    assert not (tmp_path / "ckpt.pt").exists()
