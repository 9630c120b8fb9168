"""Shared by the training stages: distributed set-up, the step loop (learning-rate schedule, progress bar, windowed
metric averages, when to evaluate and save), resume files, metrics log, PSNR.

Distributed training: launch with torchrun (it sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT);
gloo on CPU, nccl on GPU. Every rank reads its share of each epoch (loader.py), DDP averages gradients,
rank 0 writes files.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from movq_deploy.files import atomic_path, atomic_write_text
from movq_deploy.memory import MemoryBudgetError
from movq_deploy.training.mixed_precision import configure_tf32

RESUME_FORMAT = "movq-deploy-resume"


@dataclass
class Dist:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> Dist:
    """Joins the torchrun process group when WORLD_SIZE > 1 (gloo on CPU, nccl on GPU); else a single process."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    if device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return Dist(rank, world_size, torch.device("cuda", local_rank))
    return Dist(rank, world_size, torch.device(device))


def start_run(args: argparse.Namespace) -> Dist:
    """A training process's set-up: its CPU threads (--threads), the torchrun process group, TF32 (--tf32)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dist_info = setup_distributed(args.device)
    configure_tf32(args.tf32, dist_info.device)
    torch.backends.cudnn.benchmark = dist_info.device.type == "cuda"  # fixed shapes: cuDNN picks its kernels once
    return dist_info


def cleanup_distributed() -> None:
    """Waits for every rank (rank 0 may still be writing files), then leaves the process group."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a no-op in one process)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


LR_FLOOR = 0.1  # the cosine decay ends at a tenth of the peak learning rate


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """LR multiplier: linear warm-up over `warmup` steps, then cosine decay to LR_FLOOR."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return LR_FLOOR + (1 - LR_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress))


def psnr(reference: np.ndarray, test: np.ndarray) -> np.ndarray:
    """Per-image PSNR in dB of uint8 images [B, H, W, 3] (peak 255); identical images give 100 dB."""
    err = (reference.astype(np.float64) - test.astype(np.float64)) ** 2
    mse = err.reshape(len(err), -1).mean(1)
    return np.where(mse == 0, 100.0, 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12)))


def perplexity_and_dead(counts: torch.Tensor) -> tuple[float, int]:
    """Codebook usage from code counts (K,): perplexity exp(H(p)) and the number of codes never used."""
    counts = counts.double()
    p = counts / counts.sum().clamp_min(1)
    entropy = -(p * p.clamp_min(1e-12).log()).sum()
    return float(entropy.exp()), int((counts == 0).sum())


class MetricsLog:
    """Appends one JSON object per line to metrics.jsonl (rank 0 only). On resume, records past the resumed step
    are dropped first, so the log reads as one run."""

    def __init__(self, path: Path, enabled: bool, resume_step: int | None):
        self.path, self.enabled = Path(path), enabled
        if not enabled:
            return
        if resume_step is None:
            atomic_write_text(self.path, "")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def save_resume(path: Path, stage: str, step: int, state: dict) -> None:
    """The resume file: everything besides ckpt.pt that continuing the run needs (optimizers, RNG, step)."""
    payload = {"format": RESUME_FORMAT, "stage": stage, "step": step, "torch_rng": torch.get_rng_state(), **state}
    if torch.cuda.is_available():  # dropout and the GAN's noise on a GPU draw from CUDA's generators
        payload["cuda_rng"] = torch.cuda.get_rng_state_all()
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)


def load_resume(path: Path, stage: str) -> dict:
    """Reads a resume file written by save_resume and restores the random state it holds (CPU, and CUDA's where
    both runs had the same number of GPUs)."""
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no resume file {path} (was the run started with this --out?)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file gets the same one-line answer
        raise ValueError(f"--resume: {path} is corrupt or truncated ({str(e).splitlines()[0]})") from None
    if not isinstance(payload, dict) or payload.get("format") != RESUME_FORMAT or payload.get("stage") != stage:
        raise ValueError(f"--resume: {path} is not a {stage} resume file")
    torch.set_rng_state(payload["torch_rng"])
    cuda_rng = payload.get("cuda_rng")
    if cuda_rng is not None and torch.cuda.is_available() and len(cuda_rng) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda_rng)
    return payload


def resume_from(args: argparse.Namespace, path: Path, stage: str, restore: Callable[[dict, Path], None],
                main: bool) -> "tuple[int, dict]":
    """(the step to start from, the resume state): with --resume, the state of `path` restored by
    `restore(state, path)`; else (0, {})."""
    if not args.resume:
        return 0, {}
    state = load_resume(path, stage)
    restore(state, path)
    if main:
        print(f"resuming {stage} from {path} at step {state['step']} of {args.steps}", file=sys.stderr)
    return state["step"], state


class StepLoop:
    """Steps `start` .. `total` - 1 of a training stage, with the plumbing both stages share.

    Iterating sets every optimizer's learning rate (linear warm-up, then cosine decay) and advances a progress bar
    (on rank 0, unless quiet; none when stderr is not a terminal, as tqdm's disable=None does). `add` sums a step's
    metrics; `window` averages them over the steps since the last log line; `due` says when to log, evaluate or save.
    """

    def __init__(self, args: argparse.Namespace, start: int, optimizers: list, desc: str, show: bool):
        self.lr_max, self.total, self.warmup = args.lr, args.steps, args.warmup
        self.log_every, self.optimizers = args.log_every, optimizers
        self.bar = tqdm(range(start, self.total), initial=start, total=self.total, desc=desc, dynamic_ncols=True,
                        disable=None if show and not args.quiet else True)
        self.lr, self.sums, self.tic = 0.0, {}, time.time()

    def __iter__(self):
        for step in self.bar:
            self.lr = self.lr_max * warmup_cosine(step, self.total, self.warmup)
            for optimizer in self.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = self.lr
            yield step
        self.bar.close()

    def add(self, values: "dict[str, torch.Tensor]", **postfix: str) -> None:
        for key, value in values.items():
            self.sums[key] = self.sums.get(key, 0.0) + float(value.detach())
        self.bar.set_postfix(postfix)

    def due(self, done: int, every: int) -> bool:
        """Every `every` steps, and at the last step."""
        return done % every == 0 or done == self.total

    def window(self, done: int, data_wait_s: "float | None" = None, **extra) -> dict:
        """The log record of the window ending at step `done`: the averages, `extra`, the learning rate and speed;
        with `data_wait_s` (seconds spent waiting for batches in the window) also the data wait per step next to
        the step time, and its share."""
        n = self.log_every if done % self.log_every == 0 else done % self.log_every
        elapsed = time.time() - self.tic
        record = {"step": done, **{k: v / n for k, v in self.sums.items()}, **extra, "lr": self.lr,
                  "steps_per_s": n / elapsed}
        if data_wait_s is not None:
            record.update(step_s=elapsed / n, data_wait_s=data_wait_s / n, data_wait_share=data_wait_s / elapsed)
        self.sums, self.tic = {}, time.time()
        return record


def no_sync(model: torch.nn.Module, sync: bool):
    """DDP's no_sync() for the micro-batches that only accumulate gradients; the last one (sync) all-reduces them.
    A no-op outside DDP."""
    if sync or not isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return model.no_sync()


def device_memory(module: torch.nn.Module) -> "int | None":
    """Free memory of the GPU `module` lives on (its loops' budget is a share of it); None on the CPU (the
    system's available memory)."""
    device = next(module.parameters()).device
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def run_cli(build_parser: "Callable[[], argparse.ArgumentParser]", train: "Callable[[argparse.Namespace], dict]",
            argv: "list[str] | None" = None) -> None:
    """A training script's entry point: bad input (a missing file, a foreign checkpoint) exits with one line."""
    args = build_parser().parse_args(argv)
    try:
        train(args)
    except (ValueError, FileNotFoundError, MemoryBudgetError) as e:
        sys.exit(f"error: {e}")
