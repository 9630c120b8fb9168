"""The training plumbing both stages share: the step loop, and resume files restoring the random state."""
import argparse
import io

import pytest
import torch

from movq_deploy.training import common


def loop_args(**overrides):
    values = dict(lr=1e-3, steps=5, warmup=2, log_every=2, quiet=False)
    return argparse.Namespace(**{**values, **overrides})


def test_step_loop_sets_the_schedule_and_averages_each_log_window():
    params = [torch.nn.Parameter(torch.zeros(1))]
    opts = [torch.optim.SGD(params, lr=0.0), torch.optim.SGD(params, lr=0.0)]
    loop = common.StepLoop(loop_args(), start=1, optimizers=opts, desc="test", show=True)
    records, lrs = [], []
    for step in loop:
        lrs.append([group["lr"] for opt in opts for group in opt.param_groups])
        loop.add({"loss": torch.tensor(float(step))})
        if loop.due(step + 1, 2):
            records.append(loop.window(step + 1, extra=7))
    assert lrs == [[1e-3 * common.warmup_cosine(s, 5, 2)] * 2 for s in (1, 2, 3, 4)]
    # windows end at steps 2, 4 and the last step (5): the averages are over the steps in each window
    assert [(r["step"], r["loss"], r["extra"]) for r in records] == [(2, 1.0 / 2, 7), (4, 5.0 / 2, 7), (5, 4.0, 7)]
    assert list(records[0]) == ["step", "loss", "extra", "lr", "steps_per_s"]


def test_progress_bar_stays_silent_when_stderr_is_not_a_terminal(monkeypatch):
    stderr = io.StringIO()  # like a log file: not a TTY
    monkeypatch.setattr("sys.stderr", stderr)
    loop = common.StepLoop(loop_args(steps=50), start=0, optimizers=[], desc="quiet please", show=True)
    for _ in loop:
        loop.add({}, loss="1.0")
    assert loop.bar.disable and stderr.getvalue() == ""
    assert common.StepLoop(loop_args(quiet=True), 0, [], "x", show=True).bar.disable
    assert common.StepLoop(loop_args(), 0, [], "x", show=False).bar.disable  # ranks other than 0


def test_resume_restores_the_random_state(tmp_path):
    torch.manual_seed(3)
    common.save_resume(tmp_path / "resume.pt", "tokenizer", 7, {"extra": torch.ones(2)})
    expected = torch.rand(4)
    torch.manual_seed(99)
    state = common.load_resume(tmp_path / "resume.pt", "tokenizer")
    assert state["step"] == 7 and torch.equal(state["extra"], torch.ones(2))
    assert torch.equal(torch.rand(4), expected)
    assert ("cuda_rng" in state) == torch.cuda.is_available()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: CUDA's generators exist only there")
def test_resume_restores_the_cuda_random_state(tmp_path):
    torch.cuda.manual_seed_all(3)
    common.save_resume(tmp_path / "resume.pt", "prior", 1, {})
    expected = torch.rand(4, device="cuda")
    torch.cuda.manual_seed_all(99)
    common.load_resume(tmp_path / "resume.pt", "prior")
    assert torch.equal(torch.rand(4, device="cuda"), expected)
