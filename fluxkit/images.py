"""Image conversion and files: the one place a (H, W, 3) float image in [0, 1] becomes 8-bit pixels."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(H, W, 3) float in [0, 1], any device -> (H, W, 3) uint8, rounded to nearest."""
    return (image.detach().to("cpu", torch.float32).clamp(0, 1).numpy() * 255).round().astype(np.uint8)


def save_png(image: torch.Tensor, path: str | Path) -> None:
    Image.fromarray(to_uint8(image)).save(path, format="PNG")


def load_png(path: str | Path) -> torch.Tensor:
    """An image file as (H, W, 3) float32 in [0, 1]."""
    return torch.from_numpy(np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0)


def quantize_like_png(image: torch.Tensor) -> torch.Tensor:
    """The float image a PNG of `image` would load back as: what references are compared on."""
    return torch.from_numpy(to_uint8(image).astype(np.float32) / 255.0)
