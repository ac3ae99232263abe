"""Scale-sensitive recipe settings match the papers once each reward's units are accounted for.

PRDP regresses log-ratio differences onto (r_i - r_j) / beta, so beta is in reward units. The paper's
small-scale beta 3e-5 (Deng et al., Table 4) is for PickScore as a cosine (its Table 1: 0.218 -> 0.270);
our PickScore returns logit_scale.exp() * cos, and PickScore_v1's logit_scale.exp() is 100 (CLIP's cap).
"""

from pathlib import Path

import pytest
import torch

from diffusion_align.config import load_config
from rewards.pickscore import PickScoreReward
from rewards.testing import tiny_clip
from rewards.tokenizers import clip_tokenizer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PAPER_BETA_ON_COSINE = 3e-5  # PRDP Table 4, small-scale
CLIP_MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
CLIP_STD = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)


def cosine_by_hand(model, images, prompts):
    """cos(E_image, E_text) from CLIPModel's feature heads; 224 px inputs need no resize or crop."""
    tok = clip_tokenizer()(prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=(images - CLIP_MEAN) / CLIP_STD)
        txt = model.get_text_features(input_ids=tok.input_ids, attention_mask=tok.attention_mask)
    img, txt = getattr(img, "pooler_output", img), getattr(txt, "pooler_output", txt)
    return torch.nn.functional.cosine_similarity(img, txt, dim=-1)


def test_prdp_sd15_beta_is_the_papers_beta_on_pickscore_as_a_cosine(tmp_path):
    model = tiny_clip(image_size=224, patch_size=32, logit_scale=100.0)  # PickScore_v1's scale
    model.save_pretrained(tmp_path)
    reward = PickScoreReward.from_pretrained(tmp_path, processor=None)
    images = torch.rand(4, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    prompts = ["a cat", "a red fox in the snow", "two dogs", "an owl"]
    with torch.no_grad():
        ours = reward(images, prompts)
    cos = cosine_by_hand(model, images, prompts)
    assert cos.abs().min() > 0.01  # the ratio below is well defined
    units_per_cosine = (ours / cos).mean().item()
    assert units_per_cosine == pytest.approx(100.0, rel=1e-3)

    config = load_config(CONFIGS / "prdp_sd15_pickscore.yaml")
    (settings,) = config.rewards
    assert settings.name == "pickscore" and settings.weight == 1.0 and not settings.normalize
    assert config.strategy.beta / units_per_cosine == pytest.approx(PAPER_BETA_ON_COSINE, rel=1e-3)


def test_prdp_sd15_recipe_is_the_papers_small_scale_loop():
    """Algorithm 1 / Table 4: N = 32 prompts x B = 16 images per epoch, K = 10 full-batch updates."""
    config = load_config(CONFIGS / "prdp_sd15_pickscore.yaml")
    s, t = config.strategy, config.train
    assert s.group_size == 16 and t.samples_per_epoch == 32 * 16
    assert t.batch_size == t.samples_per_epoch  # one optimizer step per pass over the batch
    assert s.num_inner_epochs == 10 and s.eps == 1e-6 and t.epochs == 100
