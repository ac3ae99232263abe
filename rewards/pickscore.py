"""PickScore (Kirstain et al. 2023): `logit_scale.exp() * cos(E_image, E_text)` of a CLIP-H/14 fine-tuned on
Pick-a-Pic. Typical values ~18-24 (flow_grpo divides by 26 for a ~[0, 1] range; use a Combined scale).

`forward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` float32, differentiable w.r.t. images.
Checkpoint: the transformers `CLIPModel` `yuvalkirstain/PickScore_v1`; the tokenizer comes from the
processor repo `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (the same CLIP BPE as the bundled tokenizer,
used when neither is available). Preprocessing: shortest side 224 (bicubic), centre crop, OpenAI mean/std.
"""

from __future__ import annotations

import os

import torch

from rewards.base import Reward, check_inputs
from rewards.clip_towers import HFClipTowers, cosine, load_clip_tokenizer, load_hf_clip
from rewards.preprocess import clip_preprocess

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreReward(Reward):
    name = "pickscore"
    differentiable = True

    def __init__(self, towers: HFClipTowers):
        super().__init__()
        self.towers = towers
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike = DEFAULT_MODEL,
        processor: str | os.PathLike | None = DEFAULT_PROCESSOR,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> PickScoreReward:
        """Hub id or local `save_pretrained` directory; tokenizer from the model dir, then `processor`."""
        model = load_hf_clip(pretrained, cls.name, dtype)
        towers = HFClipTowers(model, load_clip_tokenizer(pretrained, processor))
        return cls(towers).to(device=device, dtype=dtype)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        check_inputs(images, prompts, self.name)
        t = self.towers
        pixels = clip_preprocess(images, t.image_size, t.mean, t.std)
        cos = cosine(t.encode_image(pixels), t.encode_text(prompts, images.device))
        return (t.logit_scale.exp().float() * cos).float()
