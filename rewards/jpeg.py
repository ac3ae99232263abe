"""JPEG (in)compressibility, the DDPO toy rewards: the size of the image saved as JPEG at quality 95.

`images (B, 3, H, W)` in [0, 1] -> `(B,)` float32 in kB (1 kB = 1000 bytes). Quantised to uint8 and
encoded by PIL, so not differentiable.
"""

from __future__ import annotations

import io

import numpy as np
import torch

from rewards.base import Reward, check_inputs


def jpeg_size_kb(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """`(B, 3, H, W)` in [0, 1] -> `(B,)` float32 JPEG sizes in kB, on the images' device."""
    from PIL import Image

    # numpy, not torch: a few elementwise ops on one core beat torch's thread start-up on small CPU boxes
    pixels = np.clip(np.rint(images.detach().float().cpu().numpy() * 255), 0, 255).astype(np.uint8)
    sizes = []
    for img in pixels:  # (3, H, W) -> (H, W, 3)
        buffer = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(img.transpose(1, 2, 0))).save(
            buffer, format="JPEG", quality=quality
        )
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32, device=images.device)


class JpegCompressibility(Reward):
    """reward = -JPEG size in kB (smaller files score higher)."""

    name = "jpeg_compressibility"
    differentiable = False

    def __init__(self, quality: int = 95):
        super().__init__()
        self.quality = quality

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        check_inputs(images, prompts, self.name)
        return -jpeg_size_kb(images, self.quality)


class JpegIncompressibility(JpegCompressibility):
    """reward = JPEG size in kB (larger, more detailed files score higher)."""

    name = "jpeg_incompressibility"

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        check_inputs(images, prompts, self.name)
        return jpeg_size_kb(images, self.quality)
