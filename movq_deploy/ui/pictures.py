"""Pictures the page shows or takes: uploads fitted to the model's size, brush layers turned into masks, token grids.

numpy + pillow only; every error is one line that names the problem.
"""
from __future__ import annotations

import os
from typing import Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps

# How an upload of another size is brought to the model's size.
FITS = {
    "crop": "centre-crop to a square, then resize",
    "resize": "resize (the aspect ratio may change)",
    "exact": "none: the image must already have the model's size",
}


def open_upload(path: "str | os.PathLike[str]") -> Image.Image:
    """An uploaded file as an RGB image; ValueError naming the file when it is not one."""
    name = os.path.basename(path)
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError):
        raise ValueError(f"{name} is not an image this page can read (PNG, JPEG, WebP, ...)") from None


def fit_image(image: Image.Image, size: int, fit: str) -> Tuple[np.ndarray, str]:
    """(uint8 [size,size,3], a sentence saying what was done to the image) for one of FITS."""
    if fit not in FITS:
        raise ValueError(f"fit must be one of {', '.join(FITS)}, got {fit!r}")
    width, height = image.size
    if (width, height) == (size, size):
        return np.asarray(image.convert("RGB")), f"{width}x{height}: used as it is"
    if fit == "exact":
        raise ValueError(f"the image is {width}x{height} pixels; the model takes {size}x{size} "
                         f"(choose crop or resize to fit it)")
    if fit == "crop":
        side = min(width, height)
        fitted = ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)  # centre crop, then resize
        note = f"centre-cropped {width}x{height} to {side}x{side}, then resized to {size}x{size}"
        if width == height:
            note = f"resized {width}x{height} to {size}x{size}"
    else:
        fitted = image.resize((size, size), Image.Resampling.BICUBIC)
        note = f"resized {width}x{height} to {size}x{size}"
    return np.asarray(fitted.convert("RGB")), note


def mask_from_layers(layers: Sequence[np.ndarray], shape: Tuple[int, int]) -> np.ndarray:
    """bool [H,W]: True where any brush layer (RGBA uint8 [h,w,4], drawn on a canvas of any scale) was painted.

    The editor's canvas may show the image enlarged; a painted canvas pixel marks the image pixel under it.
    """
    height, width = shape
    mask = np.zeros(shape, dtype=bool)
    for layer in layers:
        if layer is None:
            continue
        layer = np.asarray(layer)
        if layer.ndim != 3 or layer.shape[-1] != 4:
            raise ValueError(f"a brush layer must be an RGBA image, got shape {layer.shape}")
        painted = layer[..., 3] > 0  # (h, w)
        rows, cols = painted.shape
        if rows % height or cols % width or rows // height != cols // width:
            raise ValueError(f"the brush layer is {cols}x{rows} pixels, not a multiple of the {width}x{height} "
                             f"image; paint on the image shown, without resizing the canvas")
        scale = rows // height
        mask |= painted.reshape(height, scale, width, scale).any(axis=(1, 3))
    return mask


def enlarge(image: np.ndarray, scale: int) -> np.ndarray:
    """uint8 [H,W,C] -> [H*scale, W*scale, C], each pixel a scale x scale block (nearest neighbour)."""
    return np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)


def code_palette(codebook_size: int) -> np.ndarray:
    """uint8 [K, 3]: one fixed colour per code, the same on every page and every run."""
    codes = np.arange(codebook_size)
    hue = (codes * 0.6180339887) % 1.0  # golden-ratio steps: neighbouring codes get far-apart hues
    saturation = 0.55 + 0.45 * (codes % 2)  # two saturations and three brightness levels, so that codes with
    value = 0.55 + 0.225 * ((codes // 2) % 3)  # nearby hues still differ
    hsv = np.stack([hue, saturation, value], axis=1) * 255
    as_image = Image.frombytes("HSV", (codebook_size, 1), hsv.astype(np.uint8).tobytes())
    return np.asarray(as_image.convert("RGB"))[0]


def token_picture(tokens: np.ndarray, codebook_size: int, cell: int = 8, gap: int = 2) -> np.ndarray:
    """uint8 picture of a token grid int [h,w,c]: the c channels side by side, each code one colour.

    Each token is a cell x cell square; the channels are separated by `gap` white columns.
    """
    if tokens.ndim != 3:
        raise ValueError(f"tokens must be [h, w, c], got shape {tokens.shape}")
    palette = code_palette(codebook_size)
    h, w, c = tokens.shape
    panels = [enlarge(palette[tokens[..., channel]], cell) for channel in range(c)]  # c x (h*cell, w*cell, 3)
    picture = np.full((h * cell, c * w * cell + (c - 1) * gap, 3), 255, dtype=np.uint8)
    for channel, panel in enumerate(panels):
        left = channel * (w * cell + gap)
        picture[:, left:left + w * cell] = panel
    return picture
