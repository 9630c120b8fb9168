"""Stage 2: train the MaskGIT prior on the frozen tokenizer's indices.

    python train/prior.py --ckpt runs/tiny/ckpt.pt [--config tiny] [--data DIR] [--steps N] [--resume]
    torchrun --nproc_per_node 2 train/prior.py ...            # DDP: gloo on CPU, nccl on GPU

The tokenizer is loaded from ckpt.pt and frozen; --num-crops training crops (random crop + flip) and the held-out
crops are encoded once and cached beside the checkpoint (prior_tokens.pt, keyed by the tokenizer's weights).
Training is MaskGIT's: per sample r ~ U(0,1], mask ratio cos(pi/2 r), at least one slot masked, each of the
N = h*w*c slots masked on its own (so the c channels of a position are masked independently); cross-entropy on
the masked slots; AdamW with linear warm-up and cosine decay. With classes (sub-folders; for the embedded data,
the photo a crop came from) the prior is class-conditional and drops labels with probability class_dropout.
Masked-token accuracy on the held-out crops is reported before and after training.

Writes both stages into ckpt.pt (default: the --ckpt file itself; --out to write elsewhere), resume_prior.pt beside
it (what --resume continues from) and metrics_prior.jsonl.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from movq_deploy.files import atomic_path
from movq_deploy.models.checkpoint import load_models, save_checkpoint
from movq_deploy.training.data import load_data, to_tensor
from movq_deploy.models.movq import MoVQ
from movq_deploy.models.prior import MaskGITPrior, PriorConfig
from movq_deploy.training.common import (MetricsLog, cleanup_distributed, load_resume, run_cli, save_resume, setup_distributed,
                          warmup_cosine)

STAGE = "prior"
RESUME_FILE = "resume_prior.pt"
CACHE_FILE = "prior_tokens.pt"
EVAL_SEED = 1234  # fixed masks for the held-out accuracy, so start and end are comparable


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--ckpt", required=True, help="ckpt.pt holding the trained tokenizer")
    p.add_argument("--out", default=None, help="where to write the two-stage ckpt.pt (default: --ckpt itself)")
    p.add_argument("--config", default="tiny", help="PriorConfig preset: tiny | paper")
    p.add_argument("--data", default=None, help="folder of images (default: the data the tokenizer was trained on)")
    p.add_argument("--unconditional", action="store_true", help="ignore classes (default: conditional when the "
                                                                "data has >= 2 classes)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=64, help="token grids per process and step")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.045, help="AdamW weight decay (MaskGIT's 4.5e-2)")
    p.add_argument("--num-crops", type=int, default=4096, help="training crops encoded once into the token cache")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--resume", action="store_true", help="continue from resume_prior.pt beside the output")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def mask_tokens(tokens: torch.Tensor, mask_id: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """MaskGIT training masks: -> (inputs with masked slots set to mask_id, masked bool), both [B, N].

    Per sample r ~ U(0,1] and ratio cos(pi/2 r); ceil(ratio * N) slots (at least one) are chosen uniformly among
    all N slots, so the c channels of a position are masked independently of each other.
    """
    batch, num_slots = tokens.shape
    r = 1.0 - torch.rand(batch, generator=generator)  # (B,) in (0, 1]
    ratio = torch.cos(math.pi / 2 * r)
    num_masked = (ratio * num_slots).ceil().long().clamp(1, num_slots)  # (B,)
    scores = torch.rand(batch, num_slots, generator=generator)  # a random order of the slots of each sample
    order = scores.argsort(dim=1).argsort(dim=1)  # (B, N): rank of each slot in that order
    masked = (order < num_masked[:, None]).to(tokens.device)
    return tokens.masked_fill(masked, mask_id), masked


def tokenizer_digest(state: dict) -> str:
    """sha256 over the tokenizer's weights: keys the token cache and ties a resume file to its tokenizer."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


@torch.no_grad()
def encode_all(movq: MoVQ, images: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """uint8 [M, H, W, 3] -> int64 tokens [M, N] (row-major over (h, w, c))."""
    device = next(movq.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        out.append(movq.encode(to_tensor(images[start:start + batch_size]).to(device)).flatten(1).cpu())
    return torch.cat(out)


def token_cache(movq: MoVQ, digest: str, data, num_crops: int, seed: int, path: Path, write: bool) -> dict:
    """The encoded training crops and held-out crops, read from `path` when it matches, else encoded (and saved)."""
    key = {"tokenizer": digest, "data": data.summary(), "num_crops": num_crops, "seed": seed}
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                return cached
        except Exception:  # an unreadable cache is rebuilt, not an error
            pass
    train_set = data.train_set(seed=seed)
    crops = [train_set.crop(i) for i in range(num_crops)]
    train_images = np.stack([c[0] for c in crops])
    eval_images, eval_labels = data.eval_set().arrays()
    cache = {"key": key,
             "train_tokens": encode_all(movq, train_images), "train_labels": torch.tensor([c[1] for c in crops]),
             "eval_tokens": encode_all(movq, eval_images), "eval_labels": torch.from_numpy(eval_labels)}
    if write:
        with atomic_path(path) as tmp:
            torch.save(cache, tmp)
    return cache


@torch.no_grad()
def masked_accuracy(prior: MaskGITPrior, tokens: torch.Tensor, labels: torch.Tensor | None, repeats: int = 4,
                    batch_size: int = 256) -> float:
    """Accuracy of the argmax prediction on masked slots, with masks drawn from the training schedule (fixed seed)."""
    was_training = prior.training
    prior.eval()
    device = next(prior.parameters()).device
    generator = torch.Generator().manual_seed(EVAL_SEED)
    correct = total = 0
    for _ in range(repeats):
        for start in range(0, len(tokens), batch_size):
            target = tokens[start:start + batch_size].to(device)
            inputs, masked = mask_tokens(target, prior.config.mask_id, generator)
            y = labels[start:start + batch_size].to(device) if labels is not None else None
            hits = prior(inputs, y).argmax(-1) == target
            correct += int(hits[masked].sum())
            total += int(masked.sum())
    prior.train(was_training)
    return correct / max(1, total)


def train(args: argparse.Namespace) -> dict:
    """Runs stage 2; returns {"prior": the trained MaskGITPrior (unwrapped), "accuracy": {...}, "out": Path}."""
    if args.threads:
        torch.set_num_threads(args.threads)
    dist_info = setup_distributed(args.device)
    device, main = dist_info.device, dist_info.is_main
    movq, _, ckpt = load_models(args.ckpt, device, with_prior=False)  # one-line errors for bad files and weights
    movq.requires_grad_(False)
    out = Path(args.out) if args.out else Path(args.ckpt)
    run_dir = out.parent

    digest = tokenizer_digest(ckpt["tokenizer"])
    data_dir = args.data
    tokenizer_source = ckpt.get("record", {}).get("tokenizer", {}).get("data", {}).get("source")
    if data_dir is None and tokenizer_source not in (None, "skimage.data"):
        data_dir = tokenizer_source  # default: the data the tokenizer saw
    data = load_data(data_dir, movq.config.image_size)
    num_classes = 0 if args.unconditional or data.num_classes < 2 else data.num_classes
    config = PriorConfig.preset(args.config, movq.config, num_classes=num_classes)

    cache = token_cache(movq, digest, data, args.num_crops, args.seed, run_dir / CACHE_FILE, write=main)
    train_tokens, eval_tokens = cache["train_tokens"], cache["eval_tokens"]
    train_labels = cache["train_labels"] if config.conditional else None
    eval_labels = cache["eval_labels"] if config.conditional else None

    torch.manual_seed(args.seed)
    prior = MaskGITPrior(config).to(device)
    # No weight decay on biases, norms and embeddings (as nanoGPT / MaskGIT).
    decay = [p for n, p in prior.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    no_decay = [p for n, p in prior.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.96))
    start = 0
    accuracy = {}
    if args.resume:
        state = load_resume(run_dir / RESUME_FILE, STAGE)
        if state["config"] != config.to_dict() or state["tokenizer"] != digest:
            raise ValueError(f"--resume: {run_dir / RESUME_FILE} belongs to another prior config or tokenizer")
        prior.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start, accuracy = state["step"], dict(state["accuracy"])
        if main:
            print(f"resuming {out} at step {start} of {args.steps}", file=sys.stderr)
    else:
        accuracy["start"] = masked_accuracy(prior, eval_tokens, eval_labels)
    if main:
        print(f"prior {args.config}: {prior.num_parameters() / 1e6:.2f}M parameters, grid {config.grid}, "
              f"K={config.codebook_size}, classes {config.num_classes}; {len(train_tokens)} cached training grids; "
              f"held-out masked-token accuracy at the start {accuracy['start']:.4f}", file=sys.stderr)
    model = DDP(prior) if dist_info.enabled else prior
    log = MetricsLog(run_dir / "metrics_prior.jsonl", main, start if args.resume else None)

    def save(step: int) -> None:
        if not main:
            return
        record = dict(ckpt.get("record", {}))
        record[STAGE] = {"step": step, "batch_size": args.batch_size, "world_size": dist_info.world_size,
                         "lr": args.lr, "num_crops": args.num_crops, "conditional": config.conditional,
                         "masked_accuracy": dict(accuracy), "tokenizer_sha256": digest}
        save_checkpoint(out, tokenizer_config=ckpt["tokenizer_config"], tokenizer=ckpt["tokenizer"],
                        prior_config=config.to_dict(), prior=prior.state_dict(),
                        class_names=data.class_names if config.conditional else [],
                        record=record)
        save_resume(run_dir / RESUME_FILE, STAGE, step, {"config": config.to_dict(), "tokenizer": digest,
                                                         "model": prior.state_dict(), "opt": opt.state_dict(),
                                                         "accuracy": dict(accuracy)})

    sums: dict[str, float] = {}
    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, disable=not main or args.quiet,
               desc=f"prior {args.config}", dynamic_ncols=True)
    tic = time.time()
    model.train()
    for step in bar:
        lr = args.lr * warmup_cosine(step, args.steps, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        # Batch and masks are functions of (seed, step, rank): a resumed run sees what the straight run would.
        rng = np.random.default_rng([args.seed, step, dist_info.rank])
        pick = torch.from_numpy(rng.integers(len(train_tokens), size=args.batch_size))
        generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
        target = train_tokens[pick].to(device)  # (B, N)
        inputs, masked = mask_tokens(target, config.mask_id, generator)
        labels = train_labels[pick].to(device) if train_labels is not None else None

        logits = model(inputs, labels)  # (B, N, K); class dropout happens inside the model in training mode
        loss = F.cross_entropy(logits[masked], target[masked])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

        with torch.no_grad():
            acc = (logits[masked].argmax(-1) == target[masked]).float().mean()
        for k, v in {"loss": loss, "masked_accuracy": acc}.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach())
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{float(acc):.3f}")
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            n = args.log_every if done % args.log_every == 0 else done % args.log_every
            log.write({"step": done, **{k: v / n for k, v in sums.items()}, "lr": lr,
                       "steps_per_s": n / (time.time() - tic)})
            sums, tic = {}, time.time()
        if main and (done % args.eval_every == 0 or done == args.steps):
            accuracy["end"] = masked_accuracy(prior, eval_tokens, eval_labels)
            accuracy["end_step"] = done
            log.write({"step": done, "eval_masked_accuracy": accuracy["end"]})
        if done % args.save_every == 0 or done == args.steps:
            save(done)
    bar.close()
    if main:
        if start >= args.steps:  # resumed a finished run: nothing trained, make sure the checkpoint is there
            save(start)
        print(f"held-out masked-token accuracy: start {accuracy['start']:.4f}, end {accuracy.get('end', 0.0):.4f} "
              f"(chance {1 / config.codebook_size:.4f}); wrote {out}", file=sys.stderr)
    cleanup_distributed()
    return {"prior": prior, "accuracy": accuracy, "out": out}


def main(argv: list[str] | None = None) -> None:
    run_cli(build_parser, train, argv)

