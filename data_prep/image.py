"""Still images with Pillow, and the resize every picture (image or video frame) goes through: the
shorter side resized to `size`, then center-cropped to size x size, stored channels-first uint8
[3, size, size]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def cover_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(width, height) scaled so that the shorter side is exactly `size`."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def center_crop_chw(rgb: np.ndarray, size: int) -> np.ndarray:
    """[H, W, 3] -> the central [3, size, size], contiguous uint8."""
    top, left = (rgb.shape[0] - size) // 2, (rgb.shape[1] - size) // 2
    return np.ascontiguousarray(rgb[top:top + size, left:left + size].transpose(2, 0, 1), dtype=np.uint8)


def image_chw(path: str | Path, size: int) -> np.ndarray:
    """An image file as uint8 [3, size, size] (shorter side resized to `size`, center crop)."""
    with Image.open(path) as img:
        img.draft("RGB", (size, size))  # JPEG: decode at a reduced scale that is still >= size
        img = img.convert("RGB")
        img = img.resize(cover_size(*img.size, size), Image.Resampling.BILINEAR)
        return center_crop_chw(np.asarray(img), size)
