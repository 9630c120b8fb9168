"""Images in and out of the runtime: PIL or uint8 arrays in, checked; grids, masks, outpainting canvases.

The graphs take uint8 [B,H,W,3] images; everything here converts to and from that, with one-line errors.
"""
from __future__ import annotations

import math
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from PIL import Image, ImageFilter

ImagesLike = Union[Image.Image, np.ndarray, Sequence[Union[Image.Image, np.ndarray]]]
OUTPUT_TYPES = ("pil", "np")


def to_uint8_images(images: ImagesLike, size: int, what: str = "images") -> np.ndarray:
    """PIL image(s) or uint8 array(s) [H,W,3] / [B,H,W,3] of size `size` x `size` -> uint8 [B,H,W,3]."""
    if isinstance(images, (Image.Image, np.ndarray)):
        batch = [images] if isinstance(images, Image.Image) or np.ndim(images) == 3 else list(images)
    else:
        batch = list(images)
    if not batch:
        raise ValueError(f"no {what} given")
    arrays = []
    for i, image in enumerate(batch):
        if isinstance(image, Image.Image):
            array = np.asarray(image.convert("RGB"))
        elif isinstance(image, np.ndarray):
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"{what}[{i}] must be uint8 [H, W, 3], got {image.dtype} with shape {image.shape}")
            array = image
        else:
            raise TypeError(f"{what}[{i}] must be a PIL image or a uint8 array, got {type(image).__name__}")
        if array.shape[:2] != (size, size):
            raise ValueError(f"{what}[{i}] is {array.shape[1]}x{array.shape[0]} pixels; the engines take "
                             f"{size}x{size} images")
        arrays.append(array)
    return np.ascontiguousarray(np.stack(arrays))


def to_bool_masks(masks, count: int, size: int) -> np.ndarray:
    """Pixel masks (True = regenerate) -> bool [count,H,W].

    Accepts PIL images of mode "L" (pixels >= 128 are masked) or "1", and bool arrays [H,W] or [B,H,W]; one mask
    per image.
    """
    if isinstance(masks, Image.Image) or (isinstance(masks, np.ndarray) and masks.ndim == 2):
        batch = [masks]
    elif isinstance(masks, np.ndarray) and masks.ndim == 3:
        batch = list(masks)
    elif isinstance(masks, (list, tuple)):
        batch = list(masks)
    else:
        raise TypeError(f"masks must be PIL 'L'/'1' images or bool arrays, got {type(masks).__name__}"
                        + (f" with shape {masks.shape}" if isinstance(masks, np.ndarray) else ""))
    if len(batch) != count:
        raise ValueError(f"got {len(batch)} masks for {count} images; give one mask per image")
    arrays = []
    for i, mask in enumerate(batch):
        if isinstance(mask, Image.Image):
            if mask.mode not in ("L", "1"):
                raise ValueError(f"masks[{i}] has PIL mode {mask.mode!r}; use 'L' or '1' (white = regenerate)")
            array = np.asarray(mask) >= 128 if mask.mode == "L" else np.asarray(mask, dtype=bool)
        elif isinstance(mask, np.ndarray):
            if mask.dtype != bool or mask.ndim != 2:
                raise ValueError(f"masks[{i}] must be a bool array [H, W], got {mask.dtype} with shape {mask.shape}")
            array = mask
        else:
            raise TypeError(f"masks[{i}] must be a PIL 'L'/'1' image or a bool array, got {type(mask).__name__}")
        if array.shape != (size, size):
            raise ValueError(f"masks[{i}] is {array.shape[1]}x{array.shape[0]} pixels; the images are {size}x{size}")
        arrays.append(array)
    return np.stack(arrays)


def to_output(images: np.ndarray, output_type: str) -> Union[List[Image.Image], np.ndarray]:
    """uint8 [B,H,W,3] -> a list of PIL images ("pil") or the array itself ("np")."""
    check_output_type(output_type)
    if output_type == "np":
        return images
    return [Image.fromarray(image) for image in images]


def check_output_type(output_type: str, allowed: Sequence[str] = OUTPUT_TYPES) -> None:
    if output_type not in allowed:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, allowed))}; got {output_type!r}")


def paste_outside_mask(original: np.ndarray, generated: np.ndarray, masks: np.ndarray, feather: int = 2) -> np.ndarray:
    """Original pixels outside the masks, generated ones inside, blended over a seam of about 2*feather pixels.

    The seam lies outside the mask: masked pixels are always the generated ones, pixels farther than 2*feather from
    the mask are exactly the original. original, generated: uint8 [B,H,W,3]; masks: bool [B,H,W].
    """
    out = np.empty_like(generated)
    for i, mask in enumerate(masks):
        alpha = mask.astype(np.float32)
        if feather > 0 and mask.any():
            grown = Image.fromarray(mask.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(2 * feather + 1))
            soft = np.asarray(grown.filter(ImageFilter.BoxBlur(feather)), dtype=np.float32) / 255.0
            alpha = np.maximum(alpha, soft)
        alpha = alpha[..., None]  # (H, W, 1)
        blended = alpha * generated[i].astype(np.float32) + (1.0 - alpha) * original[i].astype(np.float32)
        out[i] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return out


def mask_preview(image: np.ndarray, mask: np.ndarray, grey: int = 127) -> np.ndarray:
    """uint8 [H,W,3] image with the masked pixels (bool [H,W]) greyed out: what the edit is asked to fill."""
    preview = image.copy()
    preview[mask] = grey
    return preview


def extend_canvas(
    image: Union[Image.Image, np.ndarray],
    left: int = 0,
    top: int = 0,
    right: int = 0,
    bottom: int = 0,
    fill: Tuple[int, int, int] = (127, 127, 127),
    size: Optional[int] = None,
) -> Tuple[Image.Image, Image.Image]:
    """Outpainting: the image on a canvas grown by the given margins (pixels), and the mask of the new border.

    Returns (canvas RGB, mask "L" with 255 on the border to generate). With `size`, both are resized to size x size
    (the engines' image size; the mask with nearest-neighbour so it stays binary), ready for `Generator.edit`.
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image must be uint8 [H, W, 3], got {image.dtype} with shape {image.shape}")
        image = Image.fromarray(image)
    margins = {"left": left, "top": top, "right": right, "bottom": bottom}
    for name, value in margins.items():
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name} must be a non-negative number of pixels, got {value!r}")
    width, height = image.size
    canvas = Image.new("RGB", (width + left + right, height + top + bottom), tuple(fill))
    canvas.paste(image.convert("RGB"), (left, top))
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, top, left + width, top + height))
    if size is not None:
        canvas = canvas.resize((size, size), Image.Resampling.BICUBIC)
        mask = mask.resize((size, size), Image.Resampling.NEAREST)
    return canvas, mask


def make_grid(images: ImagesLike, nrow: Optional[int] = None, padding: int = 2, pad_value: int = 255) -> Image.Image:
    """Tiles images (uint8 [B,H,W,3] or a list of PIL images / arrays of one size) into one PIL image.

    nrow: images per row (default: the smallest square that holds them all).
    """
    if isinstance(images, np.ndarray) and images.ndim == 4:
        arrays = list(images)
    elif isinstance(images, (Image.Image, np.ndarray)):
        arrays = [np.asarray(images)]
    else:
        arrays = [np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image) for image in images]
    if not arrays:
        raise ValueError("make_grid needs at least one image")
    height, width = arrays[0].shape[:2]
    if any(array.shape != arrays[0].shape or array.dtype != np.uint8 for array in arrays):
        raise ValueError("make_grid needs uint8 RGB images of one size")
    nrow = nrow or math.ceil(math.sqrt(len(arrays)))
    rows = math.ceil(len(arrays) / nrow)
    grid = np.full((rows * (height + padding) + padding, nrow * (width + padding) + padding, 3), pad_value, np.uint8)
    for i, array in enumerate(arrays):
        y = padding + (i // nrow) * (height + padding)
        x = padding + (i % nrow) * (width + padding)
        grid[y:y + height, x:x + width] = array
    return Image.fromarray(grid)


def load_image(path: "str | os.PathLike[str]") -> Image.Image:
    """An RGB PIL image from a file, with a one-line error when it is missing or not an image."""
    return _open(path, "image").convert("RGB")


def load_mask(path: "str | os.PathLike[str]") -> Image.Image:
    """A mask ("L", white = regenerate) from an image file; colour or alpha images are reduced to their luminance."""
    return _open(path, "mask").convert("L")


def _open(path: "str | os.PathLike[str]", what: str) -> Image.Image:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        with Image.open(path) as image:
            image.load()
            return image
    except (OSError, Image.DecompressionBombError) as error:
        raise ValueError(f"{what} file {path} is not a readable image ({error})") from None
