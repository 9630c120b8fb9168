"""DDP: two CPU processes launched by torchrun (gloo) train a few steps; the replicas stay identical."""
import json
import os
import subprocess
import sys
import textwrap

import torch

WORKER = textwrap.dedent("""
    import os, sys
    import torch
    from movq_deploy.models.movq import MoVQ, MoVQConfig
    from movq_deploy.training.tokenizer import build_parser, train
    out = sys.argv[1]
    args = build_parser().parse_args(["--out", out, "--steps", "3", "--batch-size", "2", "--disc-start", "1",
                                      "--restart-dead-every", "1", "--log-every", "1", "--eval-every", "3",
                                      "--save-every", "3", "--quiet", "--device", "cpu"])
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
