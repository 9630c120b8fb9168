"""Training throughput per GPU: images/s and peak memory of a training step, fp32 eager vs bf16 vs bf16 + compile.

    python benchmarks/train_throughput.py [--out results/train_throughput] [--budget-s 420]
    python benchmarks/train_throughput.py --rehearsal      # CPU, tiny models, a few steps: checks the script runs

The steps are the training scripts' own, minus data loading (random inputs of the right shape):
- tokenizer (`paper-f16`, 256²): forward, L1 + quantizer loss, backward, AdamW: the generator step before the
  discriminator starts, without LPIPS (no VGG16 weights on these machines);
- prior (`paper`, ~307M, on paper-f16's 16x16x4 grid, unconditional): MaskGIT masks, cross-entropy on the masked
  slots, backward, gradient clipping at 1.0, AdamW.
Modes: `fp32` (eager; TF32 on, the training default), `bf16` (autocast, eager), `bf16+compile` (torch.compile of
the model, inductor). Batch: for each model and eager mode, the batch doubles from --min-batch until a step runs
out of memory or reaches --max-batch; the largest that ran is timed (bf16+compile starts from bf16's, halving on
out-of-memory). Timing: --warmup steps (compilation included), then --steps steps between CUDA synchronizations.
Peak memory: torch.cuda.max_memory_allocated over those steps. Configurations that would start after --budget-s
are skipped and listed as such. Writes train_throughput.json (machine, versions, every number) and
train_throughput.md to --out, and prints the table.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.machine import machine_info  # noqa: E402
from movq_deploy.files import atomic_write_text  # noqa: E402
from movq_deploy.models.movq import MoVQ, MoVQConfig  # noqa: E402
from movq_deploy.models.prior import MaskGITPrior, PriorConfig  # noqa: E402
from movq_deploy.training.mixed_precision import CompiledOrEager, autocast, configure_tf32, fp32  # noqa: E402
from movq_deploy.training.prior import mask_tokens  # noqa: E402

MODES = ("fp32", "bf16", "bf16+compile")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--tokenizer-config", default="paper-f16")
    p.add_argument("--prior-config", default="paper")
    p.add_argument("--models", default="tokenizer,prior")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--min-batch", type=int, default=8)
    p.add_argument("--max-batch", type=int, default=512)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--budget-s", type=float, default=420, help="start no configuration after this many seconds")
    p.add_argument("--compile-backend", default="inductor")
    p.add_argument("--out", default="results/train_throughput")
    p.add_argument("--rehearsal", action="store_true",
                   help="tiny models on the CPU, batch 2-4, 2 steps: checks the script, measures nothing useful")
    return p


class TokenizerStep:
    def __init__(self, config: MoVQConfig, device: torch.device):
        self.model = MoVQ(config).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.5, 0.9))
        self.config, self.device = config, device
        self.forward = self.model

    def inputs(self, batch: int):
        s = self.config.image_size
        return (torch.rand(batch, 3, s, s, device=self.device) * 2 - 1,)

    def __call__(self, precision: str, x: torch.Tensor) -> torch.Tensor:
        with autocast(precision, self.device):
            x_rec, quant_loss, _ = self.forward(x)
        loss = (fp32(x_rec) - x).abs().mean() + quant_loss
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()


class PriorStep:
    def __init__(self, config: PriorConfig, device: torch.device):
        self.model = MaskGITPrior(config).to(device)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4, betas=(0.9, 0.96), weight_decay=0.045)
        self.config, self.device = config, device
        self.forward = self.model
        self.generator = torch.Generator().manual_seed(0)

    def inputs(self, batch: int):
        target = torch.randint(0, self.config.codebook_size, (batch, self.config.num_slots), device=self.device)
        return (target, *mask_tokens(target, self.config.mask_id, self.generator))

    def __call__(self, precision: str, target, tokens, masked) -> torch.Tensor:
        with autocast(precision, self.device):
            logits = self.forward(tokens, None)  # (B, N, K)
        loss = F.cross_entropy(fp32(logits[masked]), target[masked])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        return loss.detach()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def runs(step, precision: str, batch: int) -> bool:
    """One step at `batch`; False when it ran out of memory."""
    try:
        step(precision, *step.inputs(batch))
        synchronize(step.device)
        return True
    except torch.OutOfMemoryError:
        step.opt.zero_grad(set_to_none=True)
        free_memory(step.device)
        return False


def largest_batch(step, precision: str, start: int, limit: int) -> int:
    """Doubles from `start` while a step fits, up to `limit`; 0 when not even `start` fits."""
    best, batch = 0, start
    while batch <= limit and runs(step, precision, batch):
        best, batch = batch, batch * 2
    return best


def time_steps(step, precision: str, batch: int, warmup: int, steps: int) -> dict:
    for _ in range(warmup):
        step(precision, *step.inputs(batch))
    synchronize(step.device)
    if step.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(step.device)
    inputs = [step.inputs(batch) for _ in range(steps)]
    synchronize(step.device)
    tic = time.perf_counter()
    for args in inputs:
        step(precision, *args)
    synchronize(step.device)
    seconds = time.perf_counter() - tic
    peak = torch.cuda.max_memory_allocated(step.device) / 2 ** 30 if step.device.type == "cuda" else None
    return {"batch": batch, "step_ms": 1000 * seconds / steps, "images_per_s": batch * steps / seconds,
            "peak_memory_gib": peak}


def measure(name: str, make_step, mode: str, args, eager_batches: dict) -> dict:
    """One model in one mode: a fresh model, its largest batch, then the timed steps."""
    precision = "bf16" if mode.startswith("bf16") else "fp32"
    step = make_step()
    row = {"model": name, "mode": mode, "parameters_m": sum(p.numel() for p in step.model.parameters()) / 1e6}
    if mode.endswith("+compile"):
        compiled = CompiledOrEager(step.model, backend=args.compile_backend)
        step.forward = compiled
        batch = eager_batches.get(precision) or args.min_batch
        while batch >= 1 and not runs(step, precision, batch):  # the first call compiles
            batch //= 2
        row["compiled"] = compiled.compiled_ok
        row["compile_failure"] = compiled.failure
    else:
        batch = largest_batch(step, precision, args.min_batch, args.max_batch)
        eager_batches[precision] = batch
    if batch < 1:
        return {**row, "error": f"batch {args.min_batch} does not fit"}
    row.update(time_steps(step, precision, batch, args.warmup, args.steps))
    del step
    free_memory(torch.device(args.device))
    return row


def markdown(rows: list[dict], machine: dict) -> str:
    lines = [f"Machine: {', '.join(machine.get('gpus') or []) or machine.get('cpu_model')}", "",
             "| model | params | mode | batch | step ms | images/s | x fp32 | peak GiB | note |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    base = {r["model"]: r.get("images_per_s") for r in rows if r["mode"] == "fp32"}
    for r in rows:
        ips = r.get("images_per_s")
        ratio = f"{ips / base[r['model']]:.2f}" if ips and base.get(r["model"]) else ""
        peak = f"{r['peak_memory_gib']:.1f}" if r.get("peak_memory_gib") is not None else ""
        note = r.get("error") or r.get("skipped") or (f"compile failed: {r['compile_failure']}"
                                                        if r.get("compiled") is False else "")
        lines.append(f"| {r['model']} | {r.get('parameters_m', 0):.1f}M | {r['mode']} | {r.get('batch', '')} | "
                     f"{r.get('step_ms', 0):.1f} | {ips or 0:.1f} | {ratio} | {peak} | {note} |")
    return "\n".join(lines) + "\n"


def main(argv: "list[str] | None" = None) -> list[dict]:
    args = build_parser().parse_args(argv)
    if args.rehearsal:
        args.device, args.tokenizer_config, args.prior_config = "cpu", "tiny", "tiny"
        args.min_batch, args.max_batch, args.warmup, args.steps = 2, 4, 1, 2
        args.budget_s = float("inf")
        torch.set_num_threads(1)  # tiny steps: one thread beats two fighting over a shared CPU
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    configure_tf32(True, device)
    torch.backends.cudnn.benchmark = device.type == "cuda"  # fixed shapes: pick the fastest convolutions
    tokenizer_config = MoVQConfig.preset(args.tokenizer_config)
    makers = {"tokenizer": lambda: TokenizerStep(tokenizer_config, device),
              "prior": lambda: PriorStep(PriorConfig.preset(args.prior_config, tokenizer_config), device)}
    start, rows = time.perf_counter(), []
    for name in args.models.split(","):
        eager_batches: dict = {}
        for mode in args.modes.split(","):
            if rows and time.perf_counter() - start > args.budget_s:
                rows.append({"model": name, "mode": mode, "skipped": f"past --budget-s {args.budget_s:.0f}"})
                continue
            torch.manual_seed(0)
            rows.append(measure(name, makers[name], mode, args, eager_batches))
            print(json.dumps(rows[-1]), file=sys.stderr)
    machine = machine_info()
    table = markdown(rows, machine)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "train_throughput.json", json.dumps(
        {"rows": rows, "machine": machine, "args": vars(args), "seconds": time.perf_counter() - start}, indent=1))
    atomic_write_text(out / "train_throughput.md", table)
    print(table)
    return rows


if __name__ == "__main__":
    main()
