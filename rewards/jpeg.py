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

    # In-place numpy on an NHWC view: one core, no temporaries; torch's threaded elementwise ops cost
    # more than the JPEG encode itself on small CPU machines.
    nhwc = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    scaled = np.multiply(nhwc, 255.0, dtype=np.float32, order="C")
    np.clip(np.rint(scaled, out=scaled), 0, 255, out=scaled)
    pixels = scaled.astype(np.uint8)
    sizes = []
    for img in pixels:
        buffer = io.BytesIO()
        Image.fromarray(img).save(buffer, format="JPEG", quality=quality)
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
