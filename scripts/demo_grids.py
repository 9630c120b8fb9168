"""The demo's pictures, after training and export: what the model does, through the engines and through PyTorch.

    python scripts/demo_grids.py --ckpt runs/demo/ckpt.pt --engine-dir runs/demo/engines --out runs/demo

Writes reference_samples.png (64 samples from the PyTorch reference sampler, one row per class for a conditional
model) and edit.png (held-out crops, a masked
box, fills for several seeds, and one outpainted crop), and prints the engines' token parity with the reference
for those 64 samples.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

import movq_deploy
from movq_deploy.images import extend_canvas, make_grid, mask_preview
from movq_deploy.models.checkpoint import load_models
from movq_deploy.training.data import load_data
from movq_deploy.models.reference import ReferenceSampler

NUM_SAMPLES = 64
EDIT_SEEDS = (0, 1, 2, 3)


def held_out_crops(ckpt: dict, image_size: int, count: int) -> np.ndarray:
    """One held-out crop per photo (class), up to `count`: crops the tokenizer and the prior never trained on."""
    source = ckpt["record"]["tokenizer"]["data"]["source"]
    data_dir = None if source == "skimage.data" else source
    images, labels = load_data(data_dir, image_size).eval_set().arrays()
    firsts = [int(np.flatnonzero(labels == label)[0]) for label in np.unique(labels)]
    return images[firsts[:count]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", type=Path, required=True)
    parser.add_argument("--engine-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    movq, prior, ckpt = load_models(args.ckpt)
    reference = ReferenceSampler(movq, prior)
    generator = movq_deploy.Generator(args.engine_dir)
    print(f"engines: {generator.backend_name} ({generator.backend_reason})")

    # A conditional model gets one row per class (the photo a crop came from); an unconditional one, no labels.
    labels = None
    if generator.num_classes:
        labels = np.arange(NUM_SAMPLES) * generator.num_classes // NUM_SAMPLES
    reference_tokens = reference.sample_tokens(NUM_SAMPLES, steps=generator.default_steps, seed=args.seed,
                                               class_labels=labels)
    make_grid(reference.decode(reference_tokens.reshape(-1, *generator.grid))).save(args.out / "reference_samples.png")
    engine_tokens = generator.sample_tokens(NUM_SAMPLES, seed=args.seed, class_labels=labels)
    same = int((engine_tokens == reference_tokens).all(axis=1).sum())
    slots = float((engine_tokens == reference_tokens).mean())
    print(f"parity (fp32 ONNX Runtime vs PyTorch reference, seed {args.seed}): {same}/{NUM_SAMPLES} token grids "
          f"identical, {slots:.2%} of slots")

    size = generator.image_size
    crops = held_out_crops(ckpt, size, count=6)
    masks = np.zeros((len(crops), size, size), dtype=bool)
    masks[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = True  # the centre box
    fills = [generator.edit(crops, masks, seed=seed, paste_original=True, output_type="np") for seed in EDIT_SEEDS]
    rows = [[crops[i], mask_preview(crops[i], masks[i])] + [fill[i] for fill in fills] for i in range(len(crops))]
    canvas, border = extend_canvas(crops[0], right=size // 2, size=size)  # outpainting: half a crop to the right
    outpainted = [generator.edit(canvas, border, seed=seed, output_type="np")[0] for seed in EDIT_SEEDS]
    rows.append([np.asarray(canvas), mask_preview(np.asarray(canvas), np.asarray(border) > 0)] + outpainted)
    make_grid(np.stack([image for row in rows for image in row]), nrow=2 + len(EDIT_SEEDS)).save(args.out / "edit.png")
    for name in ("reference_samples.png", "edit.png"):
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
