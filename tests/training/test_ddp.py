"""DDP: two CPU processes launched by torchrun (gloo), each with two DataLoader workers and its DistributedSampler
share, train a few steps; the replicas stay identical; one process resumes the run (a change of world size)."""
import json
import os
import subprocess
import sys
import textwrap

import torch

from movq_deploy.models.checkpoint import load_checkpoint
from movq_deploy.training.tokenizer import build_parser, train

WORKER = textwrap.dedent("""
    import os, sys
    import torch
    from movq_deploy.models.movq import MoVQ, MoVQConfig
    from movq_deploy.training.tokenizer import build_parser, train
    out = sys.argv[1]
    args = build_parser().parse_args(["--out", out, "--steps", "3", "--batch-size", "2", "--disc-start", "1",
                                      "--restart-dead-every", "1", "--log-every", "1", "--eval-every", "3",
                                      "--save-every", "3", "--quiet", "--device", "cpu", "--workers", "2"])
    torch.manual_seed(0)  # train() starts from the same seed
    initial = MoVQ(MoVQConfig.preset("tiny")).state_dict()
    model = train(args)["model"]
    replica = os.path.join(out, f"replica{os.environ['RANK']}.pt")
    torch.save({"trained": model.state_dict(), "initial": initial}, replica)
""")


def test_two_process_ddp_keeps_replicas_identical(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(worker),
           str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    replicas = [torch.load(out / f"replica{r}.pt", weights_only=True) for r in (0, 1)]
    moved = 0
    for name, value in replicas[0]["trained"].items():
        assert torch.equal(value, replicas[1]["trained"][name]), name  # gradients were averaged, codebooks broadcast
        moved += not torch.equal(value, replicas[0]["initial"][name])
    assert moved > len(replicas[0]["trained"]) // 2  # and they did train
    steps = [json.loads(line)["step"] for line in (out / "metrics_tokenizer.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3]  # one writer (rank 0): 3 training records + 1 eval record
    assert (out / "ckpt.pt").is_file() and (out / "reconstructions.png").is_file()

    # The same run goes on in one process: the resume file does not depend on the world size.
    resumed = train(build_parser().parse_args(["--out", str(out), "--steps", "5", "--batch-size", "2", "--resume",
                                               "--log-every", "1", "--eval-every", "5", "--save-every", "5",
                                               "--quiet", "--device", "cpu", "--workers", "0"]))
    record = load_checkpoint(out / "ckpt.pt")["record"]["tokenizer"]
    assert record["step"] == 5 and record["world_size"] == 1
    steps = [json.loads(line)["step"] for line in (out / "metrics_tokenizer.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 3, 4, 5, 5]
    assert any(not torch.equal(v, replicas[0]["trained"][k]) for k, v in resumed["model"].state_dict().items())
