"""Per-prompt diversity of generated images: mean pairwise cosine distance of CLIP image embeddings.

Not a reward (it scores a set of images, not one): a collapse detector. For every prompt with at least two
images, the mean over its image pairs of `1 - cos(e_i, e_j)`; then the mean over those prompts. 0 when every
prompt's images are identical; a fine-tuned model that draws one image per prompt drifts towards it.

    diversity = ClipDiversity.from_pretrained("openai/clip-vit-base-patch32")
    value = diversity(images, prompts)       # images (N, 3, H, W) in [0, 1], N prompts (repeats grouped)
"""

from __future__ import annotations

import os

import torch
from torch import nn

from rewards.clip_towers import load_clip_vision
from rewards.errors import RewardError
from rewards.preprocess import clip_preprocess


def mean_pairwise_cosine_distance(embeddings: torch.Tensor) -> torch.Tensor:
    """`(n, D)` -> scalar: the mean of `1 - cos(e_i, e_j)` over the n(n-1)/2 pairs i < j (n >= 2)."""
    e = nn.functional.normalize(embeddings.float(), dim=-1)
    n = e.shape[0]
    i, j = torch.triu_indices(n, n, offset=1)
    return (1 - (e[i] * e[j]).sum(-1)).mean()


def per_prompt_diversity(embeddings: torch.Tensor, prompts: list[str]) -> float:
    """The mean over prompts with >= 2 images of their images' mean pairwise cosine distance; `embeddings`
    `(N, D)`, row k an image of `prompts[k]`. NaN when no prompt has two images."""
    groups: dict[str, list[int]] = {}
    for k, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(k)
    values = [mean_pairwise_cosine_distance(embeddings[rows]) for rows in groups.values() if len(rows) > 1]
    return torch.stack(values).mean().item() if values else float("nan")


class ClipDiversity(nn.Module):
    """Per-prompt diversity in a CLIP image tower's embedding space (`CLIPVisionModelWithProjection`)."""

    def __init__(self, vision, batch_size: int = 64):
        super().__init__()
        self.vision = vision.eval().requires_grad_(False)
        self.image_size = int(vision.config.image_size)
        self.batch_size = batch_size

    @classmethod
    def from_pretrained(cls, pretrained: str | os.PathLike, **kwargs) -> ClipDiversity:
        """A transformers CLIP checkpoint (hub id or folder; a full CLIPModel or its vision tower)."""
        return cls(load_clip_vision(pretrained, "diversity"), **kwargs)

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """`(N, 3, H, W)` in [0, 1] -> `(N, D)` image embeddings (projected, not normalised)."""
        device = next(self.vision.parameters()).device
        out = []
        for start in range(0, len(images), self.batch_size):
            # the CLIP mean/std every OpenAI/LAION CLIP (and the bundled shapes-clip) was trained with
            pixels = clip_preprocess(images[start : start + self.batch_size].to(device), self.image_size)
            out.append(self.vision(pixel_values=pixels).image_embeds.float())
        return torch.cat(out)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> float:
        if images.ndim != 4 or len(images) != len(prompts):
            raise RewardError(
                f"diversity: expected (N, 3, H, W) images and N prompts, got {tuple(images.shape)}"
            )
        return per_prompt_diversity(self.embed(images), list(prompts))
