"""The `movq-deploy` console script.

    movq-deploy sample --engine-dir engines/ -n 64 --seed 0 --out samples.png
    movq-deploy edit --engine-dir engines/ --image in.png --mask mask.png --out out.png --seed 0
    movq-deploy edit --engine-dir engines/ --image in.png --extend 0,0,16,0 --out wider.png   # outpainting
    movq-deploy info --engine-dir engines/
    movq-deploy serve --engine-dir engines/ [--replicas 2] [--port 8000]       # HTTP service (Ray Serve)
    movq-deploy generate --engine-dir engines/ --num-images 50000 --seed 0 --out samples/   # bulk (Ray Data)
    movq-deploy ui --engine-dir engines/ [--host 127.0.0.1] [--port 7860]                 # the web page (ui extra)

Bad input ends with one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import logging
import math
import secrets
import sys
import time
from pathlib import Path
from typing import List, Optional

import numpy as np
from PIL import Image, ImageOps

from movq_deploy.backends import BACKENDS, PRECISIONS
from movq_deploy.files import atomic_path
from movq_deploy.images import extend_canvas, load_image, load_mask, make_grid, mask_preview
from movq_deploy.serving.commands import add_serving_commands


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("movq_deploy")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        check_arguments(args)  # before any engine work: a bad --nrow must not cost a sampling run
        return args.command(args)
    except (ValueError, TypeError, OSError, RuntimeError) as error:  # OSError: missing or unreadable files
        print(f"movq-deploy {args.command_name}: error: {error}", file=sys.stderr)
        return 2
    finally:
        logger.removeHandler(handler)


def sample(args: argparse.Namespace) -> int:
    generator = _generator(args)
    seed = _seed(args.seed)
    labels = _labels(args.class_label)
    start = time.perf_counter()
    with _Progress("sampling") as progress:
        images = generator.sample(n=args.n, steps=args.steps, seed=seed, class_labels=labels,
                                  temperature=args.temperature, choice_temperature=args.choice_temperature,
                                  guidance_scale=args.guidance_scale, output_type="np", progress=progress)
    seconds = time.perf_counter() - start
    _save(make_grid(images, nrow=args.nrow), args.out)
    print(f"{len(images)} images in {seconds:.2f} s ({len(images) / seconds:.1f} images/s) on "
          f"{generator.backend_name} ({generator.precision}), seed {seed} -> {args.out}")
    return 0


def edit(args: argparse.Namespace) -> int:
    generator = _generator(args)
    size = generator.image_size
    image = load_image(args.image)
    if args.extend is not None:
        image, mask = extend_canvas(image, *_margins(args.extend), size=size)
    else:
        mask = load_mask(args.mask)
        if args.resize:
            mask = ImageOps.fit(mask, (size, size), Image.Resampling.NEAREST)
    if args.resize:
        image = ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)
    seed = _seed(args.seed)
    with _Progress("editing") as progress:
        fills = generator.edit([image] * args.n, [mask] * args.n, steps=args.steps, seed=seed,
                               class_labels=_labels(args.class_label), temperature=args.temperature,
                               choice_temperature=args.choice_temperature, guidance_scale=args.guidance_scale,
                               paste_original=args.paste_original, output_type="np", progress=progress)
    if args.before_after:  # one row: the input, the input with the mask greyed out, the fills
        before = np.asarray(image.convert("RGB"))
        masked = np.asarray(mask.convert("L")) >= 128
        row = [before, mask_preview(before, masked), *fills]
        _save(make_grid(row, nrow=args.nrow or len(row)), args.out)
    else:
        _save(Image.fromarray(fills[0]) if args.n == 1 else make_grid(fills, nrow=args.nrow), args.out)
    print(f"{args.n} edit(s) on {generator.backend_name} ({generator.precision}), seed {seed} -> {args.out}")
    return 0


def info(args: argparse.Namespace) -> int:
    generator = _generator(args)
    engine_dir = generator.engine_dir
    print(f"engine dir    {engine_dir.path}")
    print(f"backend       {generator.backend_name} ({generator.precision}): {generator.backend_reason}")
    if generator.placement:
        print(f"placement     {', '.join(f'{graph} on {where}' for graph, where in generator.placement.items())}")
    print(f"images        {generator.image_size}x{generator.image_size}, tokens {'x'.join(map(str, generator.grid))}"
          f" from {generator.codebook_size} codes")
    print(f"classes       {generator.num_classes or 'unconditional'}")
    defaults = engine_dir.sampling
    print(f"sampling      {defaults.steps} steps, temperature {defaults.temperature}, choice temperature "
          f"{defaults.choice_temperature}, guidance scale {defaults.guidance_scale:g} (defaults)")
    print(f"guidance      {'yes (prior_guided graph)' if generator.no_guidance is None else generator.no_guidance}")
    print(f"graphs        {', '.join(sorted(engine_dir.graphs))}; engines: "
          f"{', '.join(sorted(engine_dir.engines)) or 'none'}")
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """Raises ValueError naming the first bad argument (any command's; absent options are skipped)."""
    def given(name: str):
        return getattr(args, name, None)

    for name, flag, low in (("n", "-n", 1), ("nrow", "--nrow", 1), ("batch_size", "--batch-size", 1), ("threads", "--threads", 1),
                            ("steps", "--steps", 1), ("seed", "--seed", 0)):
        if given(name) is not None and given(name) < low:
            raise ValueError(f"{flag} must be {'positive' if low else 'non-negative'}, got {given(name)}")
    for name, flag, strict in (("temperature", "--temperature", True),
                               ("choice_temperature", "--choice-temperature", False),
                               ("guidance_scale", "--guidance-scale", False)):
        value = given(name)
        if value is not None and not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
            raise ValueError(f"{flag} must be a finite number {'> 0' if strict else '>= 0'}, got {value}")
    if hasattr(args, "extend") and (args.mask is None) == (args.extend is None):
        raise ValueError("give exactly one of --mask (inpainting) and --extend (outpainting)")
    if args.command_name in ("sample", "edit") and Path(args.out).is_dir():  # these write one image file
        raise ValueError(f"--out {args.out} is a directory; give an image file name")
    for name in ("image", "mask"):
        if given(name) is not None and not Path(given(name)).is_file():
            raise ValueError(f"--{name} {given(name)} does not exist")
    if given("extend") is not None:
        _margins(args.extend)


def ui(args: argparse.Namespace) -> int:
    from movq_deploy.serving.auth import check_exposure, key_from

    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    api_key = key_from(args.api_key)
    check_exposure(args.host, api_key, args.no_auth)
    try:
        from movq_deploy.ui.app import launch, local_page
    except ImportError as error:  # gradio is an extra: say how to get it
        raise RuntimeError(f"the ui command needs gradio ({error}); pip install 'movq-deploy[ui]'") from None
    blocks = local_page(args.engine_dir, backend=args.backend, precision=args.precision, batch_size=args.batch_size)
    print(f"serving the page for {args.engine_dir} at http://{args.host}:{args.port}/ (Ctrl+C stops it)")
    launch(blocks, host=args.host, port=args.port, api_key=api_key)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="movq-deploy", description="MoVQ + MaskGIT image generation from an "
                                     "engine directory (ONNX Runtime or TensorRT).")
    commands = parser.add_subparsers(dest="command_name", required=True)

    def command(name: str, function, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.set_defaults(command=function)
        sub.add_argument("--engine-dir", default="engines", help="engine directory (default: engines)")
        sub.add_argument("--backend", default="auto", choices=BACKENDS)
        sub.add_argument("--precision", default="auto", choices=PRECISIONS)
        sub.add_argument("--batch-size", type=int, default=None, help="most images per engine call")
        sub.add_argument("--threads", type=int, default=None, help="ONNX Runtime threads (default: physical cores)")
        sub.add_argument("--shared-pool", action=argparse.BooleanOptionalAction, default=None,
                         help="one process-wide ONNX Runtime thread pool for all graphs, with spinning workers (a "
                              "setting of the whole process; default: off)")
        return sub

    def sampling_options(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--seed", type=int, default=None, help="random seed (default: a fresh one, printed)")
        sub.add_argument("--steps", type=int, default=None, help="unmasking steps (default: the manifest's)")
        sub.add_argument("--class-label", action="append", default=None,
                         help="class id or name (conditional models); once for all images, or once per image")
        sub.add_argument("--temperature", type=float, default=None, help="of the token draw (default: the manifest's)")
        sub.add_argument("--choice-temperature", type=float, default=None,
                         help="of the confidence noise (default: the manifest's)")
        sub.add_argument("--guidance-scale", type=float, default=None, metavar="W",
                         help="classifier-free guidance w >= 0 (class-conditional models; default: the manifest's, "
                              "0 = unguided)")
        sub.add_argument("--nrow", type=int, default=None, help="images per grid row")

    sub = command("sample", sample, "sample new images into a grid PNG")
    sub.add_argument("-n", type=int, default=64, help="number of images (default 64)")
    sub.add_argument("--out", default="samples.png")
    sampling_options(sub)

    sub = command("edit", edit, "regenerate the masked region of an image (inpainting / outpainting)")
    sub.add_argument("--image", required=True)
    sub.add_argument("--mask", default=None, help="mask image, white = regenerate")
    sub.add_argument("--extend", default=None, metavar="L,T,R,B",
                     help="outpaint: grow the canvas by these margins (pixels), then resize to the engines' size")
    sub.add_argument("--resize", action="store_true", help="centre-crop and resize the image (and mask) to fit")
    sub.add_argument("--paste-original", action="store_true", help="keep the original pixels outside the mask")
    sub.add_argument("-n", type=int, default=1,
                     help="number of fills (fill i uses noise stream (seed, i)); n > 1 writes a grid")
    sub.add_argument("--before-after", action="store_true",
                     help="write one row: the image, the image with the mask greyed out, then the fills")
    sub.add_argument("--out", default="edited.png")
    sampling_options(sub)

    command("info", info, "show the engine directory and the backend that would run it")
    add_serving_commands(command)

    sub = command("ui", ui, "serve a web page to sample, inpaint / outpaint and reconstruct (needs the ui extra)")
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only; "
                     "any other address needs --api-key or --no-auth)")
    sub.add_argument("--port", type=int, default=7860)
    sub.add_argument("--api-key", default=None, help="the page's password (default: $MOVQ_API_KEY)")
    sub.add_argument("--no-auth", action="store_true", help="serve beyond loopback without a key (a trusted network)")
    return parser


def _generator(args: argparse.Namespace):
    from movq_deploy.generator import Generator

    return Generator(args.engine_dir, backend=args.backend, precision=args.precision, batch_size=args.batch_size,
                     threads=args.threads, shared_pool=bool(args.shared_pool))


def _seed(seed: Optional[int]) -> int:
    return secrets.randbits(31) if seed is None else seed


def _labels(values: Optional[List[str]]):
    if values is None:
        return None
    labels = [int(value) if value.lstrip("-").isdigit() else value for value in values]
    return labels[0] if len(labels) == 1 else labels


def _margins(text: str) -> List[int]:
    try:
        margins = [int(part) for part in text.split(",")]
    except ValueError:
        margins = []
    if len(margins) != 4:
        raise ValueError(f"--extend takes four comma-separated pixel counts L,T,R,B, got {text!r}")
    return margins


def _save(image: Image.Image, out: str) -> None:
    path = Path(out)
    with atomic_path(path) as tmp:
        image.save(tmp, format=Image.registered_extensions().get(path.suffix.lower(), "PNG"))


def _load_tqdm():
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class _Progress:
    """progress(done, total) -> a tqdm bar on a terminal when tqdm is installed, else (a log file, a pipe, no tqdm)
    a plain line every tenth of the way: a log gets eleven lines, not one per engine call."""

    def __init__(self, description: str):
        self.description, self.bar, self.last_tenth = description, None, -1
        self._tqdm = _load_tqdm() if sys.stderr.isatty() else None

    def __enter__(self) -> "_Progress":
        return self

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.close()

    def __call__(self, done: int, total: int) -> None:
        if self._tqdm is not None:
            if self.bar is None:
                self.bar = self._tqdm(total=total, desc=self.description, unit="call", file=sys.stderr)
            self.bar.update(done - self.bar.n)
            return
        tenth = done * 10 // max(total, 1)
        if tenth != self.last_tenth:
            self.last_tenth = tenth
            print(f"{self.description}: {done}/{total} engine calls", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
