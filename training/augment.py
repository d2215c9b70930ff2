"""Augmentation of whole batches on the training device.

Images stay uint8 on the device; each batch is turned into floats, warped with one
affine grid per image (flip, rotation, scale, shift), jittered and partly erased
in a handful of tensor operations, so no data-loader processes are needed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augment:
    flip: bool = True
    rotate_deg: float = 0.0
    scale: float = 0.0  # relative, e.g. 0.1 gives factors in [0.9, 1.1]
    shift_px: float = 0.0  # largest shift in pixels along each axis
    brightness: float = 0.0  # added to [0, 1] pixels, uniform in [-b, b]
    contrast: float = 0.0  # factor in [1 - c, 1 + c] around the image mean
    erase_p: float = 0.0  # probability of erasing one rectangle per image
    erase_area: tuple[float, float] = (0.02, 0.2)  # fraction of the image


def augment(images: torch.Tensor, aug: Augment, gen: torch.Generator | None = None) -> torch.Tensor:
    """Augment a batch of uint8 images (B, 1, H, W); returns float32 in [0, 1] on the same device."""
    x = images.float().div_(255)
    b, _, h, w = x.shape
    dev = x.device

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return torch.rand(b, device=dev, generator=gen) * (hi - lo) + lo

    if aug.flip or aug.rotate_deg or aug.scale or aug.shift_px:
        angle = uniform(-aug.rotate_deg, aug.rotate_deg) * (math.pi / 180)
        inv_scale = 1 / uniform(1 - aug.scale, 1 + aug.scale)
        flip = torch.where(torch.rand(b, device=dev, generator=gen) < 0.5, -1.0, 1.0) if aug.flip else 1.0
        cos, sin = torch.cos(angle) * inv_scale, torch.sin(angle) * inv_scale
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0] = cos * flip
        theta[:, 0, 1] = -sin
        theta[:, 1, 0] = sin * flip
        theta[:, 1, 1] = cos
        theta[:, 0, 2] = uniform(-aug.shift_px, aug.shift_px) * (2 / w)
        theta[:, 1, 2] = uniform(-aug.shift_px, aug.shift_px) * (2 / h)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    if aug.contrast or aug.brightness:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        c = uniform(1 - aug.contrast, 1 + aug.contrast).view(b, 1, 1, 1)
        br = uniform(-aug.brightness, aug.brightness).view(b, 1, 1, 1)
        x = ((x - mean) * c + mean + br).clamp_(0, 1)

    if aug.erase_p:
        area = uniform(*aug.erase_area) * (h * w)
        ratio = torch.exp(uniform(math.log(0.3), math.log(3.3)))
        eh = (area * ratio).sqrt().clamp(1, h)
        ew = (area / ratio).sqrt().clamp(1, w)
        y0 = uniform(0, 1) * (h - eh)
        x0 = uniform(0, 1) * (w - ew)
        rows = torch.arange(h, device=dev).view(1, h, 1)
        cols = torch.arange(w, device=dev).view(1, 1, w)
        inside = (
            (rows >= y0.view(b, 1, 1))
            & (rows < (y0 + eh).view(b, 1, 1))
            & (cols >= x0.view(b, 1, 1))
            & (cols < (x0 + ew).view(b, 1, 1))
        )
        chosen = (torch.rand(b, device=dev, generator=gen) < aug.erase_p).view(b, 1, 1)
        mask = (inside & chosen).unsqueeze(1)
        noise = torch.rand(x.shape, device=dev, generator=gen)
        x = torch.where(mask, noise, x)
    return x
