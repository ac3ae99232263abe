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

    # numpy on an NHWC view, a block of rows at a time: one core, and no full-size float temporary (an
    # 8000x8000 image would need 768 MB more); torch's threaded elementwise ops cost more than the JPEG
    # encode itself on small CPU machines.
    nhwc = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    rows = max(1, (1 << 20) // max(1, nhwc.shape[2] * nhwc.shape[3]))  # about 4 MB of float32 per block
    sizes = []
    for img in nhwc:
        pixels = np.empty(img.shape, dtype=np.uint8)
        for top in range(0, img.shape[0], rows):
            scaled = np.multiply(img[top : top + rows], 255.0, dtype=np.float32)
            np.clip(np.rint(scaled, out=scaled), 0, 255, out=scaled)
            pixels[top : top + rows] = scaled
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
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
