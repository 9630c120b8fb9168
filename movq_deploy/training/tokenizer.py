"""Stage 1: train the MoVQ tokenizer.

    python train/tokenizer.py --config tiny --out runs/tiny [--data DIR] [--steps N] [--resume]
    torchrun --nproc_per_node 2 train/tokenizer.py ...        # DDP: gloo on CPU, nccl on GPU

Loss (VQGAN's recipe): L1 (or L2) reconstruction + quantizer loss (codebook + beta * commitment) + LPIPS perceptual
loss when VGG16 weights are on this machine (never downloaded) + a PatchGAN hinge discriminator from --disc-start,
weighted by VQGAN's adaptive weight ||grad rec|| / ||grad gan|| at the decoder's last layer.

Writes into --out: ckpt.pt (the deliverable, see movq_deploy.models.checkpoint), resume_tokenizer.pt (weights,
optimizers, discriminator, RNG, step: what --resume continues from), metrics_tokenizer.jsonl, reconstructions.png
(held-out crops; in each pair of rows the originals above their reconstructions).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from movq_deploy.files import atomic_path
from movq_deploy.models.checkpoint import save_checkpoint
from movq_deploy.training.data import HeldOutCrops, load_data, to_tensor, to_uint8
from movq_deploy.models.movq import MoVQ, MoVQConfig
from movq_deploy.training.common import (MetricsLog, all_reduce_sum, batch_indices, cleanup_distributed, load_resume,
                          perplexity_and_dead, psnr, run_cli, save_resume, setup_distributed, unwrap, warmup_cosine)
from movq_deploy.training.perceptual import load_perceptual

STAGE = "tokenizer"
RESUME_FILE = "resume_tokenizer.pt"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="tiny", help="MoVQConfig preset: tiny | paper-f16 | vqgan-f16")
    p.add_argument("--data", default=None, help="folder of images (a class is a sub-folder); default: the "
                                                "photographs shipped with scikit-image")
    p.add_argument("--out", default="runs/tiny", help="run folder (ckpt.pt, metrics.jsonl, ...)")
    p.add_argument("--steps", type=int, default=1800, help="total optimizer steps (with --resume: the new total)")
    p.add_argument("--batch-size", type=int, default=16, help="images per process and step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50, help="linear warm-up steps, then cosine decay to lr/10")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--rec-loss", choices=("l1", "l2"), default="l1")
    p.add_argument("--perceptual-weight", type=float, default=1.0, help="used only when VGG16 weights are found")
    p.add_argument("--perceptual-weights", default=None, help="torchvision vgg16-397923af.pth (default: torch hub "
                                                              "cache); nothing is downloaded")
    p.add_argument("--disc-start", type=int, default=None,
                   help="step the PatchGAN discriminator starts at (default: off). VQGAN starts it late; in a 500-step\n"
                        "tiny run, starting it at step 300 cost 1.5 dB held-out PSNR and 60%% more time per step")
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
    return p


class PatchDiscriminator(nn.Module):
    """PatchGAN (pix2pix / taming's NLayerDiscriminator): a grid of real/fake logits, one per receptive field."""

    def __init__(self, channels: int = 64, layers: int = 2, in_channels: int = 3):
        super().__init__()
        seq: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for n in range(1, layers + 1):
            out = channels * min(2 ** n, 8)
            stride = 2 if n < layers else 1  # the last hidden layer keeps the resolution
            seq += [nn.Conv2d(width, out, 4, stride, 1, bias=False), nn.BatchNorm2d(out), nn.LeakyReLU(0.2)]
            width = out
        seq.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*seq)
        for m in self.modules():  # DCGAN init, as taming
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 1, h', w')


def adaptive_gan_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """VQGAN: balance the GAN gradient against the reconstruction gradient at the decoder's last layer."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return (nll_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


@torch.no_grad()
def restart_dead_codes(codebook: torch.Tensor, counts: torch.Tensor, z: torch.Tensor,
                       generator: torch.Generator) -> int:
    """Moves the codes with zero count onto randomly chosen chunk vectors of `z` (B, n_z, h, w), in place.

    Codebook collapse is the usual failure of small VQ models trained briefly (most codes never win a nearest-
    neighbour match, so they never move); restarting dead codes at encoder outputs (Dhariwal et al. 2020, Jukebox)
    keeps the whole codebook in use. Under DDP, rank 0's codebook is broadcast afterwards so replicas stay equal.
    """
    dead = (counts == 0).nonzero().flatten()
    if len(dead):
        chunks = z.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])  # (B*h*w*c, d)
        pick = torch.randint(len(chunks), (len(dead),), generator=generator).to(chunks.device)
        codebook[dead] = chunks[pick].to(codebook.dtype)
    if torch.distributed.is_initialized():
        torch.distributed.broadcast(codebook, src=0)
    return len(dead)


@torch.no_grad()
def evaluate(model: MoVQ, eval_set: HeldOutCrops, batch_size: int = 64) -> dict:
    """Held-out reconstruction: PSNR (uint8, as deployed), codebook usage; also returns the images."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    originals, _ = eval_set.arrays()
    recons, counts = [], torch.zeros(model.config.codebook_size, dtype=torch.int64)
    for start in range(0, len(originals), batch_size):
        indices = model.encode(to_tensor(originals[start:start + batch_size]).to(device))
        recons.append(to_uint8(model.decode(indices)))
        counts += torch.bincount(indices.flatten().cpu(), minlength=model.config.codebook_size)
    model.train(was_training)
    recons = np.concatenate(recons)
    perplexity, dead = perplexity_and_dead(counts)
    return {"psnr": float(psnr(originals, recons).mean()), "perplexity": perplexity, "dead_codes": dead,
            "originals": originals, "reconstructions": recons}


def save_grid(path: Path, originals: np.ndarray, recons: np.ndarray, columns: int = 8, count: int = 16) -> None:
    """Rows of `columns` originals, each followed by a row of their reconstructions (count images, evenly picked)."""
    pick = np.linspace(0, len(originals) - 1, min(count, len(originals))).round().astype(int)
    rows = []
    for start in range(0, len(pick), columns):
        chunk = pick[start:start + columns]
        pad = [np.zeros_like(originals[0])] * (columns - len(chunk))
        rows.append(np.concatenate(list(originals[chunk]) + pad, axis=1))
        rows.append(np.concatenate(list(recons[chunk]) + pad, axis=1))
    with atomic_path(path) as tmp:
        Image.fromarray(np.concatenate(rows, axis=0)).save(tmp, format="PNG")


def train(args: argparse.Namespace, config: MoVQConfig | None = None) -> dict:
    """Runs stage 1; returns {"model": the trained MoVQ (unwrapped), "eval": held-out metrics, "out": Path}."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dist_info = setup_distributed(args.device)
    device, main = dist_info.device, dist_info.is_main
    config = config or MoVQConfig.preset(args.config)
    data = load_data(args.data, config.image_size)
    train_set, eval_set = data.train_set(seed=args.seed), data.eval_set()
    out = Path(args.out)
    disc_start = args.disc_start
    use_disc = disc_start is not None and args.disc_weight > 0 and disc_start < args.steps

    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = MoVQ(config).to(device)
    disc = PatchDiscriminator(args.disc_channels, args.disc_layers, config.in_channels).to(device) if use_disc else None
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.5, 0.9), weight_decay=args.weight_decay)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=args.lr, betas=(0.5, 0.9)) if disc else None
    perceptual, notice = load_perceptual(args.perceptual_weights) if args.perceptual_weight > 0 else (None, "")
    if main and notice:
        print(notice, file=sys.stderr)
    perceptual = perceptual.to(device) if perceptual is not None else None

    start = 0
    if args.resume:
        state = load_resume(out / RESUME_FILE, STAGE)
        if state["config"] != config.to_dict():
            raise ValueError(f"--resume: {out / RESUME_FILE} was trained with another tokenizer config")
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if disc is not None and "disc" in state:
            disc.load_state_dict(state["disc"])
            opt_d.load_state_dict(state["opt_d"])
        start = state["step"]
        if main:
            print(f"resuming {out} at step {start} of {args.steps}", file=sys.stderr)
    if dist_info.enabled:
        model = DDP(model)
        disc = DDP(disc) if disc is not None else None
    net = unwrap(model)
    log = MetricsLog(out / "metrics_tokenizer.jsonl", main, start if args.resume else None)

    def save(step: int, evaluation: dict | None) -> None:
        if not main:
            return
        record = {STAGE: {"step": step, "batch_size": args.batch_size, "world_size": dist_info.world_size,
                          "lr": args.lr, "disc_start": disc_start if use_disc else None,
                          "perceptual": perceptual is not None, "data": data.summary()}}
        if evaluation is not None:
            record[STAGE]["eval"] = {k: evaluation[k] for k in ("step", "psnr", "perplexity", "dead_codes")}
        save_checkpoint(out / "ckpt.pt", tokenizer_config=config.to_dict(), tokenizer=net.state_dict(),
                        class_names=data.class_names, record=record)
        resume = {"config": config.to_dict(), "model": net.state_dict(), "opt": opt.state_dict(),
                  "window_counts": window_counts.cpu()}
        if disc is not None:
            resume.update(disc=unwrap(disc).state_dict(), opt_d=opt_d.state_dict())
        save_resume(out / RESUME_FILE, STAGE, step, resume)

    counts = torch.zeros(config.codebook_size, dtype=torch.int64, device=device)  # codes used since the last log
    window_counts = torch.zeros_like(counts)  # codes used since the last dead-code restart
    if args.resume and "window_counts" in state:
        window_counts += state["window_counts"].to(device)
    latest_z: list[torch.Tensor] = []  # the quantizer's input of the current step, for restarts

    def keep_z(module, inputs):
        latest_z[:] = [inputs[0].detach()]

    hook = net.quantizer.register_forward_pre_hook(keep_z)
    restarted = 0
    sums: dict[str, float] = {}
    evaluation = None
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not main or args.quiet,
               desc=f"tokenizer {args.config}", dynamic_ncols=True)
    tic = time.time()
    model.train()
    for step in bar:
        lr = args.lr * warmup_cosine(step, args.steps, args.warmup)
        for group in opt.param_groups + (opt_d.param_groups if opt_d else []):
            group["lr"] = lr
        x, _ = train_set.batch(batch_indices(step, args.batch_size, dist_info.rank, dist_info.world_size))
        x = x.to(device)  # (B, 3, H, W) in [-1, 1]

        x_rec, quant_loss, info = model(x)
        rec_loss = (x_rec - x).abs().mean() if args.rec_loss == "l1" else F.mse_loss(x_rec, x)
        nll = rec_loss
        p_loss = torch.zeros((), device=device)
        if perceptual is not None:
            p_loss = perceptual(x_rec, x)
            nll = nll + args.perceptual_weight * p_loss
        loss = nll + quant_loss
        g_loss = d_weight = d_loss = torch.zeros((), device=device)
        gan_on = disc is not None and step >= disc_start
        if gan_on:
            g_loss = -disc(x_rec).mean()
            d_weight = adaptive_gan_weight(nll, g_loss, net.last_layer_weight) * args.disc_weight
            loss = loss + d_weight * g_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if gan_on:  # hinge loss on real crops and the (detached) reconstructions
            opt_d.zero_grad(set_to_none=True)  # also drops the grads the generator step left in the discriminator
            logits_real, logits_fake = disc(x), disc(x_rec.detach())
            d_loss = 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())
            d_loss.backward()
            opt_d.step()

        with torch.no_grad():
            mse = (x_rec.clamp(-1, 1) - x).pow(2).flatten(1).mean(1)
            batch_psnr = (10 * torch.log10(4.0 / mse.clamp_min(1e-10))).mean()
        counts += info["code_counts"]
        window_counts += info["code_counts"]
        done = step + 1
        if args.restart_dead_every and done % args.restart_dead_every == 0:
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + done)
            restarted += restart_dead_codes(net.quantizer.codebook.weight.data, all_reduce_sum(window_counts),
                                            latest_z[0], generator)
            window_counts.zero_()
        values = {"loss": loss, "rec": rec_loss, "quant": quant_loss, "perceptual": p_loss, "g_loss": g_loss,
                  "d_weight": d_weight, "d_loss": d_loss, "psnr": batch_psnr}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        bar.set_postfix(loss=f"{float(loss.detach()):.4f}", psnr=f"{float(batch_psnr):.2f}")
        if done % args.log_every == 0 or done == args.steps:
            n = args.log_every if done % args.log_every == 0 else done % args.log_every
            total_counts = all_reduce_sum(counts.clone())
            perplexity, dead = perplexity_and_dead(total_counts.cpu())
            log.write({"step": done, **{k: v / n for k, v in sums.items()}, "perplexity": perplexity,
                       "dead_codes": dead, "restarted_codes": restarted, "lr": lr,
                       "steps_per_s": n / (time.time() - tic)})
            sums, tic, restarted = {}, time.time(), 0
            counts.zero_()
        if main and (done % args.eval_every == 0 or done == args.steps):
            evaluation = {"step": done, **evaluate(net, eval_set)}
            log.write({"step": done, "eval_psnr": evaluation["psnr"], "eval_perplexity": evaluation["perplexity"],
                       "eval_dead_codes": evaluation["dead_codes"]})
        if done % args.save_every == 0 or done == args.steps:
            save(done, evaluation)
    bar.close()
    hook.remove()

    if main:
        if evaluation is None:  # resumed a finished run: evaluate what is there
            evaluation = {"step": start, **evaluate(net, eval_set)}
            save(max(start, args.steps), evaluation)
        save_grid(out / "reconstructions.png", evaluation["originals"], evaluation["reconstructions"])
        print(f"held-out PSNR {evaluation['psnr']:.2f} dB on {len(eval_set)} crops, codebook perplexity "
              f"{evaluation['perplexity']:.1f}, dead codes {evaluation['dead_codes']}/{config.codebook_size}; "
              f"wrote {out / 'ckpt.pt'}", file=sys.stderr)
    cleanup_distributed()
    return {"model": net, "eval": evaluation, "out": out}


def main(argv: list[str] | None = None) -> None:
    run_cli(build_parser, train, argv)

