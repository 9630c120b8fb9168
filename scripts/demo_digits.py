"""The digits demo's judgement: class-conditional samples and inpainting through the exported graphs (ONNX Runtime),
read by a classifier that never saw a generated image.

    python scripts/demo_digits.py --engine-dir runs/demo/digits/engines --out runs/demo

The judge is scikit-learn's logistic regression fitted on the 8x8 scans of the training split; generated images are
mapped back to that space (grey, inverted, box-averaged to 8x8: movq_deploy.training.digits.digit_features). Its
"agreement" is the share of samples it reads as the class they were asked for; it is measured for unguided samples
and with classifier-free guidance at the GUIDANCE_SCALES (same seed, same labels, same count per class), beside the
samples' "spread" (mean distance between two samples of a class in that 8x8 space; guidance trades it for
agreement), with held-out real digits' spread for scale. Writes:
- digits_samples.png: one row per digit class 0..9 (the first COLUMNS of the class's samples), unguided;
- digits_samples_guided.png: the same with guidance (the largest of GUIDANCE_SCALES);
- digits_inpaint.png: held-out digits (never trained on); per row: the original, the lower half masked (grey), and
  fills for three seeds, the upper half kept;
- digits_report.json: every figure printed here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from sklearn.linear_model import LogisticRegression

import movq_deploy
from movq_deploy.files import atomic_write_text
from movq_deploy.images import make_grid, mask_preview
from movq_deploy.training.digits import DigitsData, digit_features

SAMPLES_PER_CLASS = 30
COLUMNS = 12
INPAINT_PER_CLASS = 2
INPAINT_SEEDS = (0, 1, 2)
TARGET = 0.80
GUIDANCE_SCALES = (0.0, 1.0, 3.0)  # w = 0 is unguided sampling


def fit_judge(data: DigitsData) -> LogisticRegression:
    return LogisticRegression(max_iter=5000).fit(data.train_scans.reshape(len(data.train_scans), 64),
                                                 data.train_labels)


def spread(images: np.ndarray, labels: np.ndarray) -> float:
    """Mean Euclidean distance between two different images of the same class, in the judge's 8x8 ink space."""
    distances = []
    for c in np.unique(labels):
        features = digit_features(images[labels == c])  # (m, 64)
        pairwise = np.linalg.norm(features[:, None] - features[None], axis=-1)  # (m, m)
        distances.append(pairwise.sum() / max(len(features) * (len(features) - 1), 1))
    return float(np.mean(distances))


def agreement(judge: LogisticRegression, images: np.ndarray, labels: np.ndarray) -> "tuple[float, list[float]]":
    """Overall and per-class share of `images` the judge reads as `labels`."""
    hits = judge.predict(digit_features(images)) == labels
    return float(hits.mean()), [float(hits[labels == c].mean()) for c in range(10)]


def sample_rows(generator, judge, seed: int, out: Path, **options) -> dict:
    labels = np.repeat(np.arange(10), SAMPLES_PER_CLASS)
    tic = time.perf_counter()
    images = generator.sample(len(labels), seed=seed, class_labels=labels, output_type="np", **options)
    seconds = time.perf_counter() - tic
    overall, per_class = agreement(judge, images, labels)
    shown = np.concatenate([images[labels == c][:COLUMNS] for c in range(10)])
    make_grid(shown, nrow=COLUMNS).save(out)
    return {"agreement": overall, "per_class": per_class, "spread": spread(images, labels), "samples": len(labels),
            "seconds": seconds}


def guidance_rows(generator, judge, seed: int, out: Path, unguided: dict) -> dict:
    """The judge's agreement at each of GUIDANCE_SCALES ({"w": figures}; w = 0 is `unguided`, already sampled), the
    grid of the largest; {} when the model cannot guide (an engine directory exported before guidance)."""
    if generator.no_guidance is not None:
        print(f"guidance: not measured ({generator.no_guidance})")
        return {}
    figures = {f"{w:g}": unguided if w == 0 else sample_rows(generator, judge, seed, out, guidance_scale=w)
               for w in GUIDANCE_SCALES}
    print("classifier-free guidance (same seed and labels): agreement / spread " + ", ".join(
        f"w={w} {f['agreement']:.1%} / {f['spread']:.1f} ({f['seconds']:.1f} s)" for w, f in figures.items()))
    return figures


def inpaint_rows(generator, judge, data: DigitsData, out: Path) -> dict:
    """Lower halves of held-out digits regenerated: with the digit's class, and with the null class (no label)."""
    picks = np.concatenate([np.flatnonzero(data.eval_labels == c)[:INPAINT_PER_CLASS] for c in range(10)])
    originals, labels = data.eval_images[picks], data.eval_labels[picks]
    size = data.image_size
    masks = np.zeros((len(picks), size, size), dtype=bool)
    masks[:, size // 2:] = True
    fills = [generator.edit(originals, masks, seed=seed, class_labels=labels, output_type="np")
             for seed in INPAINT_SEEDS]
    unlabeled = generator.edit(originals, masks, seed=INPAINT_SEEDS[0], output_type="np")
    rows = [[originals[i], mask_preview(originals[i], masks[i])] + [fill[i] for fill in fills]
            for i in range(len(picks))]
    make_grid(np.stack([image for row in rows for image in row]), nrow=2 + len(INPAINT_SEEDS)).save(out)
    with_label = [agreement(judge, fill, labels)[0] for fill in fills]
    return {"agreement_with_label": float(np.mean(with_label)),
            "agreement_null_class": agreement(judge, unlabeled, labels)[0], "digits": len(picks),
            "originals_agreement": agreement(judge, originals, labels)[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-dir", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    generator = movq_deploy.Generator(args.engine_dir)
    if generator.num_classes != 10:
        sys.exit(f"error: {args.engine_dir} is not a digits model (it has {generator.num_classes} classes, not 10)")
    data = DigitsData(generator.image_size)
    judge = fit_judge(data)
    held_out = float(judge.score(data.eval_scans.reshape(len(data.eval_scans), 64), data.eval_labels))
    round_trip = agreement(judge, data.eval_images, data.eval_labels)[0]
    real_spread = spread(data.eval_images, data.eval_labels)
    print(f"judge: logistic regression on {len(data.train_scans)} training scans; held-out accuracy {held_out:.1%} "
          f"on the 8x8 scans, {round_trip:.1%} on the same digits upscaled to {data.image_size}² and read back; "
          f"held-out digits' spread {real_spread:.1f}")

    samples = sample_rows(generator, judge, args.seed, args.out / "digits_samples.png", guidance_scale=0.0)
    inpaint = inpaint_rows(generator, judge, data, args.out / "digits_inpaint.png")
    verdict = "meets" if samples["agreement"] >= TARGET else "MISSES"
    print(f"samples ({generator.backend_name}, {generator.default_steps} steps): the judge reads "
          f"{samples['agreement']:.1%} of {samples['samples']} samples as the class asked for ({verdict} the "
          f"{TARGET:.0%} target); per class " + " ".join(f"{c}:{a:.0%}" for c, a in enumerate(samples["per_class"])))
    guidance = guidance_rows(generator, judge, args.seed, args.out / "digits_samples_guided.png", samples)
    print(f"inpainting (lower half of {inpaint['digits']} held-out digits): agreement {inpaint['agreement_with_label']:.1%} "
          f"with the digit's class, {inpaint['agreement_null_class']:.1%} with no class (the upper half alone)")
    report = {"judge_held_out_accuracy": held_out, "judge_round_trip_accuracy": round_trip,
              "held_out_spread": real_spread,
              "backend": generator.backend_name, "steps": generator.default_steps, "seed": args.seed,
              "samples": samples, "guidance": guidance, "inpaint": inpaint}
    atomic_write_text(args.out / "digits_report.json", json.dumps(report, indent=1))
    written = ["digits_samples.png", "digits_inpaint.png", "digits_report.json"]
    for name in written + ["digits_samples_guided.png"] * bool(guidance):
        print(f"wrote {args.out / name}")


if __name__ == "__main__":
    main()
