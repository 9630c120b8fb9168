"""Stage 1: train the MoVQ tokenizer.

    python train/tokenizer.py --config tiny --out runs/tiny [--data DIR] [--steps N] [--resume]
    python train/tokenizer.py --config paper-f16 --data DIR --precision bf16 --compile --workers 8 --tensorboard tb/
    torchrun --nproc_per_node 2 train/tokenizer.py ...        # DDP: gloo on CPU, nccl on GPU

Loss (VQGAN's recipe, with the paper's L2 reconstruction term): L2 (or L1) reconstruction + quantizer loss
(codebook + beta * commitment) + LPIPS perceptual loss when VGG16 weights are on this machine (never downloaded) + a
PatchGAN hinge discriminator from --disc-start, weighted by VQGAN's adaptive weight ||grad rec|| / ||grad gan|| at
the decoder's last layer. Under --precision bf16 the networks (tokenizer, VGG16, discriminator) run under autocast,
the loss terms are computed in fp32 and the quantizer runs in fp32 (mixed_precision.py). Batches come from a
DataLoader (loader.py): --workers processes decode and crop ahead of the step; the log records the data-wait time
next to the step time.

Writes into --out: ckpt.pt (the deliverable, see movq_deploy.models.checkpoint), resume_tokenizer.pt (weights,
optimizers, discriminator, RNG, step: what --resume continues from), metrics_tokenizer.jsonl, reconstructions.png
(held-out crops; in each pair of rows the originals above their reconstructions).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from skimage.metrics import structural_similarity
from torch.nn.parallel import DistributedDataParallel as DDP

from movq_deploy.files import atomic_path
from movq_deploy.memory import MemoryBudget
from movq_deploy.models import footprint
from movq_deploy.models.checkpoint import save_checkpoint
from movq_deploy.models.movq import MoVQ, MoVQConfig
from movq_deploy.training.common import (Dist, MetricsLog, StepLoop, all_reduce_sum, cleanup_distributed,
                                         device_memory, no_sync, perplexity_and_dead, psnr, resume_from, run_cli,
                                         save_resume, start_run, unwrap)
from movq_deploy.training.data import HeldOutCrops, ImageData, load_data, to_tensor, to_uint8
from movq_deploy.training.loader import TimedBatches, training_batches
from movq_deploy.training.losses import PatchDiscriminator, adaptive_gan_weight, hinge_d_loss
from movq_deploy.training.mixed_precision import autocast, fp32, maybe_compile
from movq_deploy.training.options import add_scale_arguments
from movq_deploy.training.perceptual import load_perceptual
from movq_deploy.training.tensorboard import TensorBoardLog


STAGE = "tokenizer"
RESUME_FILE = "resume_tokenizer.pt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="tiny", help="MoVQConfig preset: tiny | digits | paper-f16 | vqgan-f16")
    p.add_argument("--data", default=None, help="folder of images (a class is a sub-folder), or sklearn:digits "
                                                "(scikit-learn's handwritten digits); default: the photographs "
                                                "shipped with scikit-image")
    p.add_argument("--out", default="runs/tiny", help="run folder (ckpt.pt, metrics.jsonl, ...)")
    p.add_argument("--steps", type=int, default=1800, help="total optimizer steps (with --resume: the new total)")
    p.add_argument("--batch-size", type=int, default=16, help="images per process and micro-batch (see --grad-accum)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps, then cosine decay to lr/10")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--rec-loss", choices=("l1", "l2"), default="l2",
                   help="reconstruction loss: l2 (the paper's eq. 3, default) or l1 (taming's VQGAN)")
    p.add_argument("--perceptual-weight", type=float, default=1.0, help="used only when VGG16 weights are found")
    p.add_argument("--perceptual-weights", default=None, help="torchvision vgg16-397923af.pth (default: torch hub "
                                                              "cache); nothing is downloaded")
    p.add_argument("--disc-start", type=int, default=None,
                   help="step the PatchGAN discriminator starts at (default: off; VQGAN starts it late). In short tiny\n"
                        "runs it costs PSNR and time per step: see BENCHMARKS.md")
    p.add_argument("--disc-weight", type=float, default=0.1, help="GAN weight, times the adaptive weight")
    p.add_argument("--disc-channels", type=int, default=64)
    p.add_argument("--disc-layers", type=int, default=2)
    p.add_argument("--restart-dead-every", type=int, default=20,
                   help="every N steps, codes no chunk used in those steps restart at random encoder outputs (0 = off)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its resume file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_scale_arguments(p, clip_grad=None)
    return p


@torch.no_grad()
def restart_dead_codes(codebook: torch.Tensor, counts: torch.Tensor, z: torch.Tensor,
                       generator: torch.Generator, optimizer: "torch.optim.Optimizer | None" = None) -> int:
    """Moves the codes with zero count onto randomly chosen chunk vectors of `z` (B, n_z, h, w), in place, and
    zeroes those rows' optimizer moments (Adam's running averages belong to the old code, not the new one).

    Codebook collapse is the usual failure of small VQ models trained briefly (most codes never win a nearest-
    neighbour match, so they never move); restarting dead codes at encoder outputs (Dhariwal et al. 2020, Jukebox)
    keeps the whole codebook in use. Under DDP, rank 0's codebook is broadcast afterwards so replicas stay equal.
    """
    dead = (counts == 0).nonzero().flatten()
    if len(dead):
        chunks = z.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])  # (B*h*w*c, d)
        pick = torch.randint(len(chunks), (len(dead),), generator=generator).to(chunks.device)
        codebook[dead] = chunks[pick].to(codebook.dtype)  # fp32 rows, whatever the autocast dtype of z
        reset_rows(optimizer, codebook, dead)
    if torch.distributed.is_initialized():
        torch.distributed.broadcast(codebook, src=0)
    return len(dead)


@torch.no_grad()
def reset_rows(optimizer: "torch.optim.Optimizer | None", param: torch.Tensor, rows: torch.Tensor) -> None:
    """Zeroes every per-parameter state tensor of `param` (Adam's exp_avg, exp_avg_sq) at `rows`."""
    state = optimizer.state.get(param, {}) if optimizer is not None else {}
    for value in state.values():
        if torch.is_tensor(value) and value.shape == param.shape:
            value[rows.to(value.device)] = 0


def reconstruct_batch(model: MoVQ, budget: "MemoryBudget | str | None") -> int:
    """Held-out crops per encode + decode call within `budget` (measured on this model and device)."""
    device, size = next(model.parameters()).device, model.config.image_size

    @torch.no_grad()
    def reconstruct(batch: int):
        model.decode(model.encode(torch.zeros(batch, model.config.in_channels, size, size, device=device)))

    budget = MemoryBudget.resolve(budget, "--memory-budget", device_memory(model))
    return footprint.batch_size(reconstruct, budget, f"reconstructing {size}x{size} crops", device=str(device))


@torch.no_grad()
def evaluate(model: MoVQ, eval_set: HeldOutCrops, batch: int) -> dict:
    """Held-out reconstruction: PSNR and SSIM (uint8, as deployed), codebook usage; also returns the images.
    `batch` crops per call (reconstruct_batch)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    originals, _ = eval_set.arrays()
    recons, counts = [], torch.zeros(model.config.codebook_size, dtype=torch.int64)
    for start in range(0, len(originals), batch):
        indices = model.encode(to_tensor(originals[start:start + batch]).to(device))
        recons.append(to_uint8(model.decode(indices)))
        counts += torch.bincount(indices.flatten().cpu(), minlength=model.config.codebook_size)
    model.train(was_training)
    recons = np.concatenate(recons)
    perplexity, dead = perplexity_and_dead(counts)
    ssim = np.mean([structural_similarity(a, b, channel_axis=-1, data_range=255) for a, b in zip(originals, recons)])
    return {"psnr": float(psnr(originals, recons).mean()), "ssim": float(ssim), "perplexity": perplexity,
            "dead_codes": dead, "originals": originals, "reconstructions": recons}


def grid_image(originals: np.ndarray, recons: np.ndarray) -> np.ndarray:
    """Rows of 8 originals, each followed by a row of their reconstructions (16 images, evenly picked)."""
    columns, count = 8, 16
    pick = np.linspace(0, len(originals) - 1, min(count, len(originals))).round().astype(int)
    rows = []
    for start in range(0, len(pick), columns):
        chunk = pick[start:start + columns]
        pad = [np.zeros_like(originals[0])] * (columns - len(chunk))
        rows.append(np.concatenate(list(originals[chunk]) + pad, axis=1))
        rows.append(np.concatenate(list(recons[chunk]) + pad, axis=1))
    return np.concatenate(rows, axis=0)  # uint8 [H, W, 3]


def save_grid(path: Path, grid: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(grid).save(tmp, format="PNG")


class CodeUsage:
    """Codebook usage while training: code counts since the last log line (perplexity, dead codes) and since the
    last dead-code restart, which happens every `every` steps (0: never)."""

    def __init__(self, size: int, device: torch.device, every: int, seed: int, window: torch.Tensor | None = None):
        self.counts = torch.zeros(size, dtype=torch.int64, device=device)  # codes used since the last log
        self.window = torch.zeros_like(self.counts)  # codes used since the last dead-code restart
        if window is not None:
            self.window += window.to(device)
        self.every, self.seed, self.restarted = every, seed, 0

    def add(self, code_counts: torch.Tensor) -> None:
        self.counts += code_counts
        self.window += code_counts

    def maybe_restart(self, done: int, codebook: nn.Parameter, z: torch.Tensor, optimizer) -> None:
        if self.every and done % self.every == 0:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + done)
            self.restarted += restart_dead_codes(codebook, all_reduce_sum(self.window), z, generator, optimizer)
            self.window.zero_()

    def log_fields(self) -> dict:
        """perplexity, dead_codes (over all ranks) and restarted_codes since the last call; starts a new window."""
        perplexity, dead = perplexity_and_dead(all_reduce_sum(self.counts.clone()).cpu())
        fields = {"perplexity": perplexity, "dead_codes": dead, "restarted_codes": self.restarted}
        self.restarted = 0
        self.counts.zero_()
        return fields


@dataclass
class Stage1:
    """The tokenizer, its optional discriminator and perceptual loss, their optimizers, and one training step."""

    args: argparse.Namespace
    config: MoVQConfig
    model: nn.Module  # the MoVQ, or its DDP wrapper
    disc: nn.Module | None
    opt: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer | None
    perceptual: nn.Module | None
    forward: "Callable | None" = None  # the model, or torch.compile of it: set by ready()

    @classmethod
    def build(cls, args: argparse.Namespace, config: MoVQConfig, device: torch.device, main: bool) -> "Stage1":
        use_disc = args.disc_start is not None and args.disc_weight > 0 and args.disc_start < args.steps
        torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
        model = MoVQ(config).to(device)
        disc = PatchDiscriminator(args.disc_channels, args.disc_layers, config.in_channels).to(device) \
            if use_disc else None
        opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.5, 0.9), weight_decay=args.weight_decay)
        opt_d = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.5, 0.9)) if disc else None
        perceptual, notice = load_perceptual(args.perceptual_weights) if args.perceptual_weight > 0 else (None, "")
        if main and notice:
            print(notice, file=sys.stderr)
        perceptual = perceptual.to(device) if perceptual is not None else None
        return cls(args, config, model, disc, opt, opt_d, perceptual)

    @property
    def net(self) -> MoVQ:
        return unwrap(self.model)

    @property
    def optimizers(self) -> list:
        return [self.opt] + ([self.opt_d] if self.opt_d else [])

    def restore(self, state: dict, path: Path) -> None:
        if state["config"] != self.config.to_dict():
            raise ValueError(f"--resume: {path} was trained with another tokenizer config")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        if self.disc is not None and "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])

    def ready(self, distributed: bool) -> None:
        """DDP wrappers when distributed, then the forward the steps call (compiled with --compile)."""
        if distributed:
            self.model = DDP(self.model)
            self.disc = DDP(self.disc) if self.disc is not None else None
        if self.args.compile and self.disc is not None:
            # The adaptive GAN weight differentiates twice through the compiled backward (retain_graph), which
            # AOT autograd's donated buffers forbid; without them the backward keeps a few more activations.
            torch._functorch.config.donated_buffer = False
        self.forward = maybe_compile(self.model, self.args.compile, backend=self.args.compile_backend)

    def resume_state(self, window_counts: torch.Tensor) -> dict:
        state = {"config": self.config.to_dict(), "model": self.net.state_dict(), "opt": self.opt.state_dict(),
                 "window_counts": window_counts.cpu()}
        if self.disc is not None:
            state.update(disc=unwrap(self.disc).state_dict(), opt_d=self.opt_d.state_dict())
        return state

    def step(self, micro_batches: "list[torch.Tensor]", step: int) -> "tuple[dict, torch.Tensor]":
        """One optimizer step over micro-batches of images (B, 3, H, W) in [-1, 1], their gradients accumulated
        (DDP all-reduces on the last one only); -> (the step's loss terms averaged over them, code counts (K,))."""
        args, n = self.args, len(micro_batches)
        gan_on = self.disc is not None and step >= args.disc_start
        sums: dict = {}
        counts, fakes = 0, []
        self.opt.zero_grad(set_to_none=True)
        for i, x in enumerate(micro_batches):
            with no_sync(self.model, sync=i == n - 1):
                values, x_rec, code_counts = self.generator_loss(x, gan_on)
                (values["loss"] / n).backward()
            sums = {k: sums.get(k, 0.0) + v.detach() / n for k, v in values.items()}
            counts, fakes = counts + code_counts, fakes + [x_rec.detach()]
        clip(self.net.parameters(), args.clip_grad, sums)
        self.opt.step()
        if gan_on:
            self.opt_d.zero_grad(set_to_none=True)  # also drops the grads the generator step left in the discriminator
            for i, (x, fake) in enumerate(zip(micro_batches, fakes)):
                with no_sync(self.disc, sync=i == n - 1):
                    with autocast(args.precision, x.device):
                        logits_real, logits_fake = self.disc(x), self.disc(fake)
                    d_loss = hinge_d_loss(*fp32(logits_real, logits_fake))
                    (d_loss / n).backward()
                sums["d_loss"] = sums["d_loss"] + d_loss.detach() / n
            self.opt_d.step()
        return sums, counts

    def generator_loss(self, x: torch.Tensor, gan_on: bool) -> "tuple[dict, torch.Tensor, torch.Tensor]":
        """The loss terms of one micro-batch (fp32), its reconstruction (fp32) and code counts (K,)."""
        args, zero = self.args, torch.zeros((), device=x.device)
        with autocast(args.precision, x.device):
            x_rec, quant_loss, info = self.forward(x)
        x_rec = fp32(x_rec)
        rec_loss = (x_rec - x).abs().mean() if args.rec_loss == "l1" else F.mse_loss(x_rec, x)
        nll, p_loss = rec_loss, zero
        if self.perceptual is not None:
            with autocast(args.precision, x.device):
                p_loss = fp32(self.perceptual(x_rec, x))
            nll = nll + args.perceptual_weight * p_loss
        loss = nll + quant_loss
        g_loss = d_weight = zero
        if gan_on:
            with autocast(args.precision, x.device):
                g_loss = -fp32(self.disc(x_rec)).mean()
            d_weight = adaptive_gan_weight(nll, g_loss, self.net.last_layer_weight) * args.disc_weight
            loss = loss + d_weight * g_loss
        with torch.no_grad():
            mse = (x_rec.clamp(-1, 1) - x).pow(2).flatten(1).mean(1)
            batch_psnr = (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()
        values = {"loss": loss, "rec": rec_loss, "quant": quant_loss, "perceptual": p_loss, "g_loss": g_loss,
                  "d_weight": d_weight, "d_loss": zero, "psnr": batch_psnr}
        return values, x_rec, info["code_counts"]


def clip(parameters, max_norm: "float | None", values: dict) -> None:
    """Clips the gradient norm to max_norm (None or 0: no clipping) and records the norm before clipping."""
    if max_norm:
        values["grad_norm"] = torch.nn.utils.clip_grad_norm_(parameters, max_norm).detach()


def save(out: Path, step: int, stage: Stage1, data: ImageData, dist_info: Dist, codes: CodeUsage,
         evaluation: dict | None) -> None:
    """ckpt.pt (with the training record and the latest evaluation) and the resume file."""
    args = stage.args
    record = {STAGE: {"step": step, "batch_size": args.batch_size, "world_size": dist_info.world_size,
                      "lr": args.lr, "disc_start": args.disc_start if stage.disc is not None else None,
                      "perceptual": stage.perceptual is not None, "data": data.summary()}}
    if evaluation is not None:
        record[STAGE]["eval"] = {k: evaluation[k] for k in ("step", "psnr", "perplexity", "dead_codes")}
    save_checkpoint(out / "ckpt.pt", tokenizer_config=stage.config.to_dict(), tokenizer=stage.net.state_dict(),
                    class_names=data.class_names, record=record)
    save_resume(out / RESUME_FILE, STAGE, step, stage.resume_state(codes.window))


def train(args: argparse.Namespace, config: MoVQConfig | None = None) -> dict:
    """Runs stage 1; returns {"model": the trained MoVQ (unwrapped), "eval": held-out metrics, "out": Path}."""
    dist_info = start_run(args)
    device, main = dist_info.device, dist_info.is_main
    config = config or MoVQConfig.preset(args.config)
    data = load_data(args.data, config.image_size)
    out = Path(args.out)
    stage = Stage1.build(args, config, device, main)
    start, state = resume_from(args, out / RESUME_FILE, STAGE, stage.restore, main)
    stage.ready(dist_info.enabled)
    batches = TimedBatches(training_batches(data.train_set(seed=args.seed), args.batch_size, dist_info.rank,
                                            dist_info.world_size, args.seed, args.workers, device, start,
                                            args.grad_accum))
    log = MetricsLog(out / "metrics_tokenizer.jsonl", main, start if args.resume else None)
    board = TensorBoardLog(args.tensorboard, STAGE, enabled=main)
    codes = CodeUsage(config.codebook_size, device, args.restart_dead_every, args.seed, state.get("window_counts"))
    latest_z: list[torch.Tensor] = []  # the quantizer's input of the current step, for restarts

    def keep_z(module, inputs):
        latest_z[:] = [inputs[0].detach()]

    eval_batch = reconstruct_batch(stage.net, args.memory_budget) if main else 0
    hook = stage.net.quantizer.register_forward_pre_hook(keep_z)
    evaluation = None
    loop = StepLoop(args, start, stage.optimizers, f"tokenizer {args.config}", show=main)
    stage.model.train()
    for step in loop:
        values, code_counts = stage.step([batches.next(device)[0] for _ in range(args.grad_accum)], step)
        codes.add(code_counts)
        done = step + 1
        codes.maybe_restart(done, stage.net.quantizer.codebook.weight, latest_z[0], stage.opt)
        loop.add(values, loss=f"{float(values['loss']):.4f}", psnr=f"{float(values['psnr']):.2f}")
        if loop.due(done, args.log_every):
            record = loop.window(done, data_wait_s=batches.take_wait(), **codes.log_fields())
            log.write(record)
            board.record(record)
        if main and loop.due(done, args.eval_every):
            evaluation = {"step": done, **evaluate(stage.net, data.eval_set(), eval_batch)}
            log_evaluation(evaluation, log, board)
        if main and loop.due(done, args.save_every):
            save(out, done, stage, data, dist_info, codes, evaluation)
    hook.remove()
    if main:
        if evaluation is None:  # resumed a finished run: evaluate what is there
            evaluation = {"step": start, **evaluate(stage.net, data.eval_set(), eval_batch)}
            save(out, max(start, args.steps), stage, data, dist_info, codes, evaluation)
        save_grid(out / "reconstructions.png", grid_image(evaluation["originals"], evaluation["reconstructions"]))
        print(f"held-out PSNR {evaluation['psnr']:.2f} dB, SSIM {evaluation['ssim']:.4f} on "
              f"{len(evaluation['originals'])} crops, codebook perplexity {evaluation['perplexity']:.1f}, dead codes "
              f"{evaluation['dead_codes']}/{config.codebook_size}; data wait {batches.wait_share():.1%} of the "
              f"training time; wrote {out / 'ckpt.pt'}", file=sys.stderr)
    board.close()
    cleanup_distributed()
    return {"model": stage.net, "eval": evaluation, "out": out}


def log_evaluation(evaluation: dict, log: MetricsLog, board: TensorBoardLog) -> None:
    record = {"step": evaluation["step"], "eval_psnr": evaluation["psnr"], "eval_ssim": evaluation["ssim"],
              "eval_perplexity": evaluation["perplexity"], "eval_dead_codes": evaluation["dead_codes"]}
    log.write(record)
    board.record(record)
    board.image("reconstructions", grid_image(evaluation["originals"], evaluation["reconstructions"]),
                evaluation["step"])


def main(argv: list[str] | None = None) -> None:
    run_cli(build_parser, train, argv)

