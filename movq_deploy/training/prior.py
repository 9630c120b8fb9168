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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from movq_deploy.files import atomic_path
from movq_deploy.memory import MemoryBudget, check_fits, format_bytes
from movq_deploy.models import footprint
from movq_deploy.models.checkpoint import load_models, save_checkpoint
from movq_deploy.models.movq import MoVQ
from movq_deploy.models.prior import MaskGITPrior, PriorConfig
from movq_deploy.models.reference import ReferenceSampler
from movq_deploy.training.common import (MetricsLog, StepLoop, cleanup_distributed, device_memory, no_sync,
                                         resume_from, run_cli, save_resume, start_run)
from movq_deploy.training.data import ImageData, load_data, to_tensor
from movq_deploy.training.loader import default_workers, first_crops
from movq_deploy.training.mixed_precision import autocast, fp32, maybe_compile
from movq_deploy.training.options import add_scale_arguments
from movq_deploy.training.tensorboard import TensorBoardLog


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
    p.add_argument("--batch-size", type=int, default=64, help="token grids per process and micro-batch (see --grad-accum)")
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
    add_scale_arguments(p, clip_grad=1.0)  # MaskGIT clips the gradient norm at 1.0
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


def encode_batch(movq: MoVQ, budget: MemoryBudget) -> int:
    """Crops per encoder call within `budget` (measured on this model and device)."""
    device, size = next(movq.parameters()).device, movq.config.image_size

    @torch.no_grad()
    def encode(batch: int):
        movq.encode(torch.zeros(batch, movq.config.in_channels, size, size, device=device))

    return footprint.batch_size(encode, budget, f"encoding {size}x{size} crops", device=str(device))


@torch.no_grad()
def encode_all(movq: MoVQ, batches) -> "tuple[torch.Tensor, torch.Tensor]":
    """Batches of (float crops [b, 3, H, W] in [-1, 1], labels [b]) -> int64 tokens [M, N] (row-major over
    (h, w, c)) and labels [M]; each batch is encoded as it arrives, so only the tokens are kept."""
    device = next(movq.parameters()).device
    tokens, labels = [], []
    for crops, crop_labels in batches:
        tokens.append(movq.encode(crops.to(device)).flatten(1).cpu())
        labels.append(crop_labels)
    return torch.cat(tokens), torch.cat(labels)


def token_cache(movq: MoVQ, digest: str, data, num_crops: int, seed: int, path: Path, write: bool,
                workers: int = 0, budget: "MemoryBudget | None" = None) -> dict:
    """The encoded training crops and held-out crops, read from `path` when it matches, else encoded (and saved);
    `workers` DataLoader processes decode the crops, as many per batch as the encoder takes within `budget`."""
    key = {"tokenizer": digest, "data": data.summary(), "num_crops": num_crops, "seed": seed}
    if path.is_file():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            if cached.get("key") == key:
                return cached
        except Exception:  # an unreadable cache is rebuilt, not an error
            pass
    batch = encode_batch(movq, MemoryBudget.resolve(budget, "--memory-budget", device_memory(movq)))
    train_tokens, train_labels = encode_all(movq, first_crops(data.train_set(seed=seed), num_crops, batch, workers))
    eval_images, eval_labels = data.eval_set().arrays()
    eval_batches = ((to_tensor(eval_images[start:start + batch]), torch.from_numpy(eval_labels[start:start + batch]))
                    for start in range(0, len(eval_images), batch))
    eval_tokens, eval_labels = encode_all(movq, eval_batches)
    cache = {"key": key, "train_tokens": train_tokens, "train_labels": train_labels,
             "eval_tokens": eval_tokens, "eval_labels": eval_labels}
    if write:
        with atomic_path(path) as tmp:
            torch.save(cache, tmp)
    return cache


def accuracy_batch(prior: MaskGITPrior, budget: "MemoryBudget | None") -> int:
    """Token grids per call of the held-out accuracy within `budget` (measured on this prior and device)."""
    device, config = next(prior.parameters()).device, prior.config
    labels = (lambda batch: torch.zeros(batch, dtype=torch.long, device=device)) if config.conditional else \
        (lambda batch: None)

    @torch.no_grad()
    def predict(batch: int):
        prior(torch.zeros(batch, config.num_slots, dtype=torch.long, device=device), labels(batch)).argmax(-1)

    budget = MemoryBudget.resolve(budget, "--memory-budget", device_memory(prior))
    return footprint.batch_size(predict, budget, "the held-out accuracy of the prior", device=str(device))


@torch.no_grad()
def masked_accuracy(prior: MaskGITPrior, tokens: torch.Tensor, labels: torch.Tensor | None, batch: int) -> float:
    """Accuracy of the argmax prediction on masked slots, with masks drawn from the training schedule (fixed seed,
    4 draws per grid), `batch` grids per call (the masks do not depend on it)."""
    was_training = prior.training
    prior.eval()
    device = next(prior.parameters()).device
    generator = torch.Generator().manual_seed(EVAL_SEED)
    correct = total = 0
    for _ in range(4):
        inputs, masked = mask_tokens(tokens, prior.config.mask_id, generator)
        for start in range(0, len(tokens), batch):
            part = slice(start, start + batch)
            y = labels[part].to(device) if labels is not None else None
            hits = prior(inputs[part].to(device), y).argmax(-1) == tokens[part].to(device)
            correct += int(hits[masked[part].to(device)].sum())
            total += int(masked[part].sum())
    prior.train(was_training)
    return correct / max(1, total)


def check_training_fits(prior: MaskGITPrior, opt: torch.optim.Optimizer, args: argparse.Namespace) -> None:
    """Before the first step: a one-line MemoryBudgetError when a step at --batch-size would need more memory than
    is available (measured: a forward and backward at batch 1 and 2, plus the optimizer's state to come)."""
    device, config = next(prior.parameters()).device, prior.config

    def step(batch: int):
        tokens = torch.zeros(batch, config.num_slots, dtype=torch.long, device=device)
        labels = torch.zeros(batch, dtype=torch.long, device=device) if config.conditional else None
        with autocast(args.precision, device):
            logits = prior(tokens, labels)
        F.cross_entropy(fp32(logits).flatten(0, 1), tokens.flatten()).backward()
        prior.zero_grad(set_to_none=True)

    cost = footprint.measure(step, device=str(device))
    weights = sum(p.numel() * p.element_size() for p in prior.parameters() if p.requires_grad)
    # the gradients (all of them live at the step's end) and the optimizer's state (made at the first step)
    held = max(cost.peak_fixed, weights) + (0 if opt.state else weights * optimizer_state_factor(opt))
    needed = held + args.batch_size * cost.peak_per_item
    check_fits(needed, f"a training step of the {args.config} prior at --batch-size {args.batch_size}",
               hint=f"a step at --batch-size 1 needs {format_bytes(held + cost.peak_per_item)}; a smaller --batch-size "
                    f"with --grad-accum keeps the same batch per optimizer step", available=device_memory(prior))


def optimizer_state_factor(opt: torch.optim.Optimizer) -> int:
    """Tensors the optimizer keeps per parameter: 2 for Adam and AdamW (the moments), else 1 (momentum)."""
    return 2 if isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)) else 1


@dataclass
class Stage2:
    """The prior being trained, its optimizer, and what its checkpoint records: the tokenizer checkpoint it
    extends, the tokenizer's digest, the data and the held-out accuracy so far."""

    args: argparse.Namespace
    config: PriorConfig
    prior: MaskGITPrior
    opt: torch.optim.Optimizer
    ckpt: dict  # the tokenizer's checkpoint (weights, config, training record)
    digest: str
    data: ImageData
    out: Path
    world_size: int
    eval_batch: int  # held-out grids per call of masked_accuracy (from the memory budget)
    accuracy: dict = field(default_factory=dict)

    def restore(self, state: dict, path: Path) -> None:
        if state["config"] != self.config.to_dict() or state["tokenizer"] != self.digest:
            raise ValueError(f"--resume: {path} belongs to another prior config or tokenizer")
        self.prior.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.accuracy = dict(state["accuracy"])

    def evaluate(self, step: int, eval_tokens: torch.Tensor, eval_labels: "torch.Tensor | None", log: MetricsLog,
                 board: TensorBoardLog, movq: MoVQ) -> None:
        """The held-out masked-token accuracy at `step`, logged (and a sample grid on TensorBoard)."""
        self.accuracy.update(end=masked_accuracy(self.prior, eval_tokens, eval_labels, self.eval_batch), end_step=step)
        record = {"step": step, "eval_masked_accuracy": self.accuracy["end"]}
        log.write(record)
        board.record(record)
        if board.writer is not None:
            board.image("samples", sample_grid(movq, self.prior), step)

    def save(self, step: int) -> None:
        """Both stages into ckpt.pt, and the resume file beside it."""
        args, config = self.args, self.config
        record = dict(self.ckpt.get("record", {}))
        record[STAGE] = {"step": step, "batch_size": args.batch_size, "world_size": self.world_size,
                         "lr": args.lr, "num_crops": args.num_crops, "conditional": config.conditional,
                         "masked_accuracy": dict(self.accuracy), "tokenizer_sha256": self.digest}
        save_checkpoint(self.out, tokenizer_config=self.ckpt["tokenizer_config"], tokenizer=self.ckpt["tokenizer"],
                        prior_config=config.to_dict(), prior=self.prior.state_dict(),
                        class_names=self.data.class_names if config.conditional else [], record=record)
        save_resume(self.out.parent / RESUME_FILE, STAGE, step,
                    {"config": config.to_dict(), "tokenizer": self.digest, "model": self.prior.state_dict(),
                     "opt": self.opt.state_dict(), "accuracy": dict(self.accuracy)})


def training_data(args: argparse.Namespace, movq: MoVQ, ckpt: dict, main: bool) -> "tuple[ImageData, dict]":
    """The images (by default those the tokenizer saw) and their token cache (see token_cache)."""
    data_dir = args.data
    tokenizer_source = ckpt.get("record", {}).get("tokenizer", {}).get("data", {}).get("source")
    if data_dir is None and tokenizer_source not in (None, "skimage.data"):
        data_dir = tokenizer_source  # default: the data the tokenizer saw
    data = load_data(data_dir, movq.config.image_size)
    run_dir = (Path(args.out) if args.out else Path(args.ckpt)).parent
    digest = tokenizer_digest(ckpt["tokenizer"])
    workers = args.workers if args.workers is not None else default_workers(next(movq.parameters()).device)
    return data, token_cache(movq, digest, data, args.num_crops, args.seed, run_dir / CACHE_FILE, write=main,
                             workers=workers, budget=args.memory_budget)


def step_batches(args: argparse.Namespace, step: int, rank: int, tokens: torch.Tensor, labels: "torch.Tensor | None",
                 device: torch.device) -> "tuple[list[tuple[torch.Tensor, torch.Tensor | None]], torch.Generator]":
    """The --grad-accum micro-batches of token grids [B, N] (and labels [B]) of optimizer step `step`, and the
    generator of their masks. Both are functions of (seed, step, rank): a resumed run sees what the straight run
    would."""
    rng = np.random.default_rng([args.seed, step, rank])
    picks = torch.from_numpy(rng.integers(len(tokens), size=args.batch_size * args.grad_accum))
    generator = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    micro_batches = [(tokens[pick].to(device), None if labels is None else labels[pick].to(device))
                     for pick in picks.split(args.batch_size)]
    return micro_batches, generator


def train_step(forward, model: torch.nn.Module, opt: torch.optim.Optimizer, mask_id: int,
               micro_batches: "list[tuple[torch.Tensor, torch.Tensor | None]]", generator: torch.Generator,
               args: argparse.Namespace) -> dict:
    """One optimizer step over micro-batches of token grids [B, N] (and labels [B]): cross-entropy on the slots
    MaskGIT's schedule masks, gradients accumulated, clipped to --clip-grad; `forward` is the model or its compiled
    form, `model` the module DDP syncs."""
    n, sums = len(micro_batches), {}
    opt.zero_grad(set_to_none=True)
    for i, (tokens, labels) in enumerate(micro_batches):
        inputs, masked = mask_tokens(tokens, mask_id, generator)
        with no_sync(model, sync=i == n - 1):
            with autocast(args.precision, tokens.device):
                logits = forward(inputs, labels)  # (B, N, K); class dropout happens inside in training mode
            logits = fp32(logits[masked])
            loss = F.cross_entropy(logits, tokens[masked])
            (loss / n).backward()
        with torch.no_grad():
            acc = (logits.argmax(-1) == tokens[masked]).float().mean()
        for key, value in {"loss": loss.detach(), "masked_accuracy": acc}.items():
            sums[key] = sums.get(key, 0.0) + value / n
    if args.clip_grad:
        sums["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_grad).detach()
    opt.step()
    return sums


def train(args: argparse.Namespace) -> dict:
    """Runs stage 2; returns {"prior": the trained MaskGITPrior (unwrapped), "accuracy": {...}, "out": Path}."""
    dist_info = start_run(args)
    device, main = dist_info.device, dist_info.is_main
    movq, _, ckpt = load_models(args.ckpt, device, with_prior=False)  # one-line errors for bad files and weights
    movq.requires_grad_(False)
    data, cache = training_data(args, movq, ckpt, main)
    num_classes = 0 if args.unconditional or data.num_classes < 2 else data.num_classes
    config = PriorConfig.preset(args.config, movq.config, num_classes=num_classes)
    train_tokens, eval_tokens = cache["train_tokens"], cache["eval_tokens"]
    train_labels, eval_labels = (cache["train_labels"], cache["eval_labels"]) if config.conditional else (None, None)

    torch.manual_seed(args.seed)
    prior = MaskGITPrior(config).to(device)
    opt = prior.configure_optimizers(args.weight_decay, args.lr)
    out = Path(args.out) if args.out else Path(args.ckpt)
    stage = Stage2(args, config, prior, opt, ckpt, cache["key"]["tokenizer"], data, out, dist_info.world_size,
                   eval_batch=accuracy_batch(prior, args.memory_budget))
    start, _ = resume_from(args, out.parent / RESUME_FILE, STAGE, stage.restore, main)
    check_training_fits(prior, opt, args)
    if not args.resume:
        stage.accuracy["start"] = masked_accuracy(prior, eval_tokens, eval_labels, stage.eval_batch)
    if main:
        print(f"prior {args.config}: {prior.num_parameters() / 1e6:.2f}M parameters, grid {config.grid}, "
              f"K={config.codebook_size}, classes {config.num_classes}; {len(train_tokens)} cached training grids; "
              f"held-out masked-token accuracy at the start {stage.accuracy['start']:.4f}", file=sys.stderr)
    model = DDP(prior) if dist_info.enabled else prior
    forward = maybe_compile(model, args.compile, backend=args.compile_backend)
    log = MetricsLog(out.parent / "metrics_prior.jsonl", main, start if args.resume else None)
    board = TensorBoardLog(args.tensorboard, STAGE, enabled=main)
    loop = StepLoop(args, start, [opt], f"prior {args.config}", show=main)
    model.train()
    for step in loop:
        micro_batches, generator = step_batches(args, step, dist_info.rank, train_tokens, train_labels, device)
        values = train_step(forward, model, opt, config.mask_id, micro_batches, generator, args)
        loop.add(values, loss=f"{float(values['loss']):.3f}", acc=f"{float(values['masked_accuracy']):.3f}")
        done = step + 1
        if loop.due(done, args.log_every):
            record = loop.window(done)
            log.write(record)
            board.record(record)
        if main and loop.due(done, args.eval_every):
            stage.evaluate(done, eval_tokens, eval_labels, log, board, movq)
        if main and loop.due(done, args.save_every):
            stage.save(done)
    if main:
        if start >= args.steps:  # resumed a finished run: nothing trained, make sure the checkpoint is there
            stage.save(start)
        print(f"held-out masked-token accuracy: start {stage.accuracy['start']:.4f}, end "
              f"{stage.accuracy.get('end', 0.0):.4f} (chance {1 / config.codebook_size:.4f}); wrote {out}",
              file=sys.stderr)
    board.close()
    cleanup_distributed()
    return {"prior": prior, "accuracy": stage.accuracy, "out": out}


@torch.no_grad()
def sample_grid(movq: MoVQ, prior: MaskGITPrior, count: int = 16, columns: int = 8) -> np.ndarray:
    """uint8 [H, W, 3]: `count` samples (8 MaskGIT steps, seed 0; the classes in turn when conditional)."""
    was_training = prior.training
    prior.eval()
    labels = np.arange(count) % prior.config.num_classes if prior.config.conditional else None
    images = ReferenceSampler(movq, prior).sample(count, steps=8, seed=0, class_labels=labels)  # [n, H, W, 3]
    prior.train(was_training)
    rows = images.reshape(count // columns, columns, *images.shape[1:])
    return np.concatenate([np.concatenate(list(row), axis=1) for row in rows], axis=0)


def main(argv: list[str] | None = None) -> None:
    run_cli(build_parser, train, argv)

