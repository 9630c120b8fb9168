"""The paper's Fig. 6 at toy scale: which parts of MoVQ help reconstruction, on the embedded photographs.

    python benchmarks/studies/ablation.py                          # every Fig. 6 row, 2 seeds, table on stdout
    python benchmarks/studies/ablation.py --steps 200 --jobs 2 --markdown BENCHMARKS.md
    python benchmarks/studies/ablation.py --from-json runs/ablation/ablation.json --markdown BENCHMARKS.md   # re-render

Rows (all start from the tiny preset: 64² crops -> 8x8 grid, K = 512 codes, the same recipe, steps, batch,
learning rate and seeds; no discriminator, so the comparison measures the tokenizers and not GAN noise;
`--image-size 32` keeps the 8x8 grid by dropping the tiny preset's first level, for a quarter of the compute):
- (a) architecture: A = VQGAN (8x8x1, plain decoder); B = A + multichannel quantization (8x8x4); C = B + the
  spatially conditional norm, once per initial feature F0 (conv, fourier, sinusoid, learned).
- (b) codebook size: C-fourier with K = 512 (the tiny preset's, playing the paper's 1024) vs K = 8192 (16x).
- (c) channels: C-fourier with c in {1, 2, 4, 8} (n_z = 64 split into c chunks of 64 / c).
Rows shared between groups (C-fourier = (b) K=512 = (c) c=4) are trained once.

Metrics on the fixed held-out crops (a strip of each photo no training crop touches): PSNR, SSIM
(skimage.metrics) and codebook perplexity, mean ± std over the seeds. LPIPS needs VGG16 weights (--lpips-weights,
torchvision's vgg16-397923af.pth; LPIPS' linear heads from the lpips package when installed) and rFID a TorchScript
Inception-v3 of the FID reference (--inception, e.g. clean-fid's / StyleGAN3's inception-2015-12-05.pt). Nothing
is downloaded: without them the table says they were not computed.

Older variants (the same-bit-budget comparison in BENCHMARKS.md's "Tokenizer ablation" section) stay available by
name: movq, vqgan, movq-nomod, vqgan-wide, vqgan-same-grid.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from benchmarks.recon_metrics import lpips_distance, rfid, ssim
from movq_deploy.files import atomic_write_text
from movq_deploy.models.movq import MoVQ, MoVQConfig
from movq_deploy.training.common import psnr
from movq_deploy.training.tokenizer import build_parser as tokenizer_parser
from movq_deploy.training.tokenizer import train as train_tokenizer

SECTION = "## Fig. 6 at toy scale"
FIG6 = ["A", "B", "C-conv", "C-fourier", "C-sinusoid", "C-learned", "K-x16", "c1", "c2", "c8"]
# The paper's FFHQ numbers (256², 16x16 grid, 1024 codes) where its text gives them: the VQGAN baseline and MoVQ
# (Table 1), and the rFID of each F0 (§4.4). Fig. 6's other bars are only plotted.
PAPER = {"A": "PSNR 22.24, SSIM 0.6641, rFID 4.42", "C-fourier": "PSNR 26.72, SSIM 0.8212, rFID 2.26",
         "C-sinusoid": "rFID 3.52", "C-learned": "rFID 3.48"}


def variants(base: MoVQConfig) -> "dict[str, tuple[MoVQConfig, str, str]]":
    """name -> (config, group, description)."""
    vqgan = dataclasses.replace(base, num_chunks=1, modulation="none", f0="conv")
    multichannel = dataclasses.replace(vqgan, num_chunks=4)
    modulated = {f0: dataclasses.replace(multichannel, modulation="first", f0=f0)
                 for f0 in ("conv", "fourier", "sinusoid", "learned")}
    movq = modulated["fourier"]
    rows = {
        "A": (vqgan, "(a)", "A: VQGAN, 8x8x1"),
        "B": (multichannel, "(a)", "B: A + multichannel, 8x8x4"),
        **{f"C-{f0}": (config, "(a)", f"C: B + spatial norm, F0 {f0}") for f0, config in modulated.items()},
        "K-x16": (dataclasses.replace(movq, codebook_size=16 * movq.codebook_size), "(b)",
                  f"C-fourier with K = {16 * movq.codebook_size} (16x)"),
        **{f"c{c}": (dataclasses.replace(movq, num_chunks=c), "(c)", f"C-fourier with c = {c}") for c in (1, 2, 8)},
    }
    same_bits = dataclasses.replace(base, block_out_channels=base.block_out_channels[:-1], num_chunks=1,
                                    modulation="none", f0="conv")
    rows.update({  # the same-bit-budget comparison (16x16x1 vs 8x8x4)
        "movq": (base, "bits", "MoVQ tiny: 8x8x4, shared codebook, modulated decoder"),
        "vqgan": (same_bits, "bits", "VQGAN baseline: 16x16x1, plain decoder"),
        "movq-nomod": (dataclasses.replace(base, modulation="none", f0="conv"), "bits", "8x8x4, plain decoder"),
        "vqgan-wide": (widened_to(same_bits, MoVQ(base).num_parameters()), "bits",
                       "VQGAN baseline widened to MoVQ's parameter count"),
        "vqgan-same-grid": (vqgan, "bits", "VQGAN on MoVQ's 8x8 grid: c = 1, so 1/4 of the bits"),
    })
    return rows


def base_config(image_size: int) -> MoVQConfig:
    """The tiny preset at `image_size`, with as many levels as keep its 8x8 grid."""
    tiny = MoVQConfig.preset("tiny")
    levels = round(math.log2(image_size / tiny.latent_size)) + 1
    if not 1 <= levels <= tiny.num_levels or image_size != tiny.latent_size * 2 ** (levels - 1):
        raise ValueError(f"--image-size must be {tiny.latent_size} times a power of two up to {tiny.image_size}")
    return dataclasses.replace(tiny, image_size=image_size, block_out_channels=tiny.block_out_channels[-levels:])


def widened_to(config: MoVQConfig, target_params: int) -> MoVQConfig:
    """`config` with every level's width scaled by one factor, the scaled config closest to `target_params`."""
    g = config.norm_groups
    best = config
    for factor in np.arange(1.0, 4.01, 0.125):
        widths = tuple(max(g, int(round(ch * factor / g)) * g) for ch in config.block_out_channels)
        candidate = dataclasses.replace(config, block_out_channels=widths)
        if abs(MoVQ(candidate).num_parameters() - target_params) < abs(MoVQ(best).num_parameters() - target_params):
            best = candidate
    return best


def run_variant(name: str, config: MoVQConfig, seed: int, args: argparse.Namespace) -> dict:
    """Trains one (variant, seed) with train/tokenizer.py's loop and measures it on the held-out crops."""
    if args.threads:
        torch.set_num_threads(args.threads)
    argv = ["--out", str(Path(args.out) / f"{name}-s{seed}"), "--steps", str(args.steps), "--batch-size",
            str(args.batch_size), "--lr", str(args.lr), "--seed", str(seed), "--device", args.device,
            "--eval-every", str(args.steps), "--save-every", str(args.steps), "--rec-loss", args.rec_loss, "--quiet"]
    argv += ["--threads", str(args.threads)] if args.threads else []
    tic = time.time()
    result = train_tokenizer(tokenizer_parser().parse_args(argv), config)
    seconds = time.time() - tic
    ev = result["eval"]
    originals, recons = ev["originals"], ev["reconstructions"]
    h, w, c = config.grid
    row = {"variant": name, "seed": seed, "grid": f"{h}x{w}x{c}", "K": config.codebook_size,
           "bits": h * w * c * math.log2(config.codebook_size), "params_m": result["model"].num_parameters() / 1e6,
           "psnr": float(psnr(originals, recons).mean()), "ssim": float(ssim(originals, recons).mean()),
           "perplexity": ev["perplexity"], "dead_codes": ev["dead_codes"], "seconds": seconds,
           "eval_crops": len(originals)}
    if args.lpips_weights:
        row["lpips"] = lpips_distance(originals, recons, args.lpips_weights)
    if args.inception:
        row["rfid"] = rfid(originals, recons, args.inception)
    return row


def _run_job(job) -> dict:
    name, config, seed, args = job
    row = run_variant(name, config, seed, args)
    print(json.dumps(row), flush=True)
    return row


def summarize(rows: "list[dict]", table_of: dict) -> "list[dict]":
    """One line per variant: the mean and (population) std over its seeds of every metric."""
    table = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        line = {"variant": name, "group": table_of[name][1], "what": table_of[name][2], "seeds": len(mine),
                **{k: mine[0][k] for k in ("grid", "K", "bits", "params_m", "eval_crops")}}
        for key in ("psnr", "ssim", "perplexity", "lpips", "rfid", "seconds"):
            if all(key in r for r in mine):
                line[key], line[f"{key}_std"] = float(np.mean([r[key] for r in mine])), float(
                    np.std([r[key] for r in mine]))
        table.append(line)
    return table


def _cell(line: dict, key: str, digits: int) -> str:
    if key not in line:
        return "not computed"
    spread = f" ± {line[f'{key}_std']:.{digits}f}" if line["seeds"] > 1 else ""
    return f"{line[key]:.{digits}f}{spread}"


def markdown(table: "list[dict]", header: str, verdict: str) -> str:
    lines = [SECTION, "", header, "",
             "| group | row | what | grid | K | params | PSNR (dB) | SSIM | perplexity | LPIPS | rFID | paper (FFHQ) |",
             "| --- | --- | --- | --- | ---: | ---: | --- | --- | --- | --- | --- | --- |"]
    for t in table:
        lines.append(f"| {t['group']} | {t['variant']} | {t['what']} | {t['grid']} | {t['K']} | {t['params_m']:.3f}M "
                     f"| {_cell(t, 'psnr', 2)} | {_cell(t, 'ssim', 4)} | {_cell(t, 'perplexity', 0)} "
                     f"| {_cell(t, 'lpips', 4)} | {_cell(t, 'rfid', 1)} | {PAPER.get(t['variant'], '(plot only)')} |")
    lines += ["", verdict, ""]
    return "\n".join(lines)


def compare(by: dict, better: str, worse: str, claim: str) -> str:
    """One sentence: does `better` beat `worse` in PSNR and SSIM, and by more than the seed spread?"""
    if better not in by or worse not in by:
        return ""
    b, w = by[better], by[worse]
    dp, ds = b["psnr"] - w["psnr"], b["ssim"] - w["ssim"]
    spread = max(b.get("psnr_std", 0.0), w.get("psnr_std", 0.0))
    holds = "holds" if dp > 0 and ds > 0 else ("is mixed" if (dp > 0) != (ds > 0) else "does not hold")
    size = "beyond" if abs(dp) > 2 * spread else "within"
    return (f"- {claim} ({better} vs {worse}): **{holds}**, PSNR {dp:+.2f} dB, SSIM {ds:+.4f}; the PSNR gap is "
            f"{size} twice the larger seed std ({spread:.2f} dB).")


def verdict_text(table: "list[dict]") -> str:
    by = {t["variant"]: t for t in table}
    lines = [compare(by, "B", "A", "multichannel helps"),
             compare(by, "C-conv", "B", "the spatial norm helps (F0 conv)"),
             compare(by, "C-fourier", "C-conv", "Fourier F0 beats conv F0"),
             compare(by, "C-fourier", "C-sinusoid", "Fourier F0 beats sinusoid F0"),
             compare(by, "C-fourier", "C-learned", "Fourier F0 beats a learned constant"),
             compare(by, "K-x16", "C-fourier", "a 16x codebook helps"),
             compare(by, "c8", "C-fourier", "8 channels beat 4"),
             compare(by, "C-fourier", "c2", "4 channels beat 2"),
             compare(by, "c2", "c1", "2 channels beat 1")]
    return "\n".join(line for line in lines if line)


def write_section(path: Path, section: str) -> None:
    """Replaces this script's section of `path` (from its heading to the next '## ' heading), or appends it."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    atomic_write_text(path, text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default="fig6", help="'fig6' (every Fig. 6 row) or a comma list of: "
                                                      + ", ".join(variants(MoVQConfig())))
    p.add_argument("--steps", type=int, default=500)
    p.add_argument("--image-size", type=int, default=64, help="crop size: 64 (the tiny preset) or 32 (8x8 grid kept)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--rec-loss", choices=("l1", "l2"), default="l2", help="as train/tokenizer.py (default l2)")
    p.add_argument("--seeds", default="0,1", help="comma list of seeds (mean ± std over seeds)")
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, one process each")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch threads per run")
    p.add_argument("--lpips-weights", default=None, help="torchvision's vgg16-397923af.pth: also report LPIPS")
    p.add_argument("--inception", default=None, help="TorchScript FID Inception (inception-2015-12-05.pt): rFID")
    p.add_argument("--from-json", default=None, help="re-render the table from an earlier run's ablation.json")
    p.add_argument("--markdown", default=None, help=f"write the table into this file's '{SECTION}' section")
    return p


def main(argv: "list[str] | None" = None) -> None:
    args = build_parser().parse_args(argv)
    table_of = variants(base_config(args.image_size))
    names = FIG6 if args.variants == "fig6" else [n.strip() for n in args.variants.split(",") if n.strip()]
    unknown = [n for n in names if n not in table_of]
    if unknown:
        sys.exit(f"error: unknown variant(s) {unknown}; choose from {list(table_of)}")
    tic = time.time()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        rows, header = saved["rows"], saved["header"]
    else:
        seeds = [int(s) for s in args.seeds.split(",")]
        jobs = [(name, table_of[name][0], seed, args) for seed in seeds for name in names]
        if args.jobs > 1:
            with ProcessPoolExecutor(args.jobs, mp_context=torch.multiprocessing.get_context("spawn")) as pool:
                rows = list(pool.map(_run_job, jobs))
        else:
            rows = [_run_job(job) for job in jobs]
        device = (torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available()
                  else f"CPU ({platform.processor() or platform.machine()}, {args.threads or 'default'} threads/run)")
        command = "python benchmarks/studies/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
        header = (f"Command: `{command.strip()}` ({(time.time() - tic) / 60:.0f} min, {args.jobs} run(s) at once). "
                  f"Budget per run: {args.steps} steps x batch {args.batch_size}, lr {args.lr}, {args.rec_loss} "
                  f"loss, no discriminator, seeds {args.seeds}, {args.image_size}² crops; metrics on the "
                  f"{rows[0]['eval_crops']} held-out "
                  f"crops, mean ± std over seeds. Ran on: {device}, {time.strftime('%Y-%m-%d')}.")
        Path(args.out).mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.out) / "ablation.json", json.dumps({"rows": rows, "header": header}, indent=1))
    table = summarize(rows, table_of)
    section = markdown(table, header, verdict_text(table))
    print(section)
    if args.markdown:
        write_section(Path(args.markdown), section)


if __name__ == "__main__":
    main()
