"""CLIPScore and PickScore against the official transformers / open_clip scoring paths."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image

import rewards
from rewards import testing as tiny
from rewards.clip_score import CLIPScoreReward
from rewards.clip_towers import HFClipTowers
from rewards.pickscore import PickScoreReward
from rewards.tokenizers import clip_tokenizer

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at night", "x"]


def pil_images(n=3, h=150, w=200, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / w
    out = []
    for a, b in rng.uniform(2, 9, (n, 2)):
        rgb = np.stack([np.sin(a * xx) * 0.5 + 0.5, np.cos(b * yy) * 0.5 + 0.5, xx * yy], -1)
        out.append(Image.fromarray((rgb * 255).round().astype(np.uint8)))
    return out


def as_tensor(pil):
    return torch.stack([torch.from_numpy(np.asarray(p).copy()).permute(2, 0, 1) for p in pil]).float() / 255


def official_logits(model, pil, prompts):
    """`CLIPProcessor` + `CLIPModel(...)`: logits_per_image = logit_scale.exp() * cos, diagonal pairs."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    proc = CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=clip_tokenizer())
    inputs = proc(text=prompts, images=pil, return_tensors="pt", padding=True, truncation=True, max_length=77)
    with torch.no_grad():
        return model(**inputs).logits_per_image.diag()


@pytest.fixture(scope="module")
def clip224():
    return tiny.tiny_clip(image_size=224, patch_size=32, logit_scale=100.0)  # OpenAI CLIP: exp(scale) = 100


def test_clipscore_matches_official_logits(clip224):
    pil = pil_images()
    reward = CLIPScoreReward(HFClipTowers(clip224, clip_tokenizer()), clamp=False)
    with torch.no_grad():
        ours = reward(as_tensor(pil), PROMPTS)
    ref = official_logits(clip224, pil, PROMPTS)
    assert torch.allclose(ours, ref, atol=0.05)


def test_pickscore_matches_official_formula(tmp_path):
    torch.manual_seed(0)
    model = tiny.tiny_clip(image_size=224, patch_size=32, logit_scale=20.0)  # a non-100 scale must be used
    model.save_pretrained(tmp_path)
    reward = PickScoreReward.from_pretrained(tmp_path, processor=None)  # no tokenizer files: bundled BPE
    pil = pil_images(seed=1)
    with torch.no_grad():
        ours = reward(as_tensor(pil), PROMPTS)
    assert torch.allclose(ours, official_logits(model, pil, PROMPTS), atol=0.02)


def test_clamp_is_straight_through(clip224):
    """Reported value max(100 cos, 0); gradient of the unclamped score (so negative pairs still improve)."""
    model = copy.deepcopy(clip224)
    with torch.no_grad():
        model.visual_projection.weight.neg_()  # flips the sign of every cosine: make some negative
    towers = HFClipTowers(model, clip_tokenizer())
    clamped, raw = CLIPScoreReward(towers), CLIPScoreReward(towers, clamp=False)
    x = torch.rand(3, 3, 64, 64)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    sa, sb = clamped(xa, PROMPTS), raw(xb, PROMPTS)
    assert (sb < 0).any() and torch.equal(sa, sb.clamp(min=0))
    sa.sum().backward()
    sb.sum().backward()
    assert torch.allclose(xa.grad, xb.grad) and xa.grad.abs().sum() > 0


def test_plain_clipmodel_directory_with_and_without_tokenizer_files(tmp_path):
    with_tok = tiny.save_tiny_clip(tmp_path / "with")
    without = tiny.save_tiny_clip(tmp_path / "without", with_tokenizer=False)
    assert not (without / "vocab.json").exists() and (with_tok / "vocab.json").exists()
    a, b = rewards.build("clip", pretrained=with_tok), rewards.build("clip", pretrained=without)
    x = torch.rand(3, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(a(x, PROMPTS), b(x, PROMPTS))
    # the tokenizer really is used: a different prompt changes the score
    with torch.no_grad():
        assert not torch.allclose(a(x, PROMPTS), a(x, ["zebra"] * 3))


def test_open_clip_backend_matches_open_clip_forward(tmp_path):
    import open_clip

    arch, d = tiny.save_tiny_hps(tmp_path)  # any open_clip weights file; HPS's format is a common one
    reward = CLIPScoreReward.from_pretrained(d / "HPS_v2.1_compressed.pt", open_clip_arch=arch, clamp=False)
    model, _, preprocess = open_clip.create_model_and_transforms(
        arch, pretrained=str(d / "HPS_v2.1_compressed.pt")
    )
    pil = pil_images(h=64, w=64)
    with torch.no_grad():
        i = model.encode_image(torch.stack([preprocess(p) for p in pil]), normalize=True)
        t = model.encode_text(open_clip.get_tokenizer(arch)(PROMPTS), normalize=True)
        ref = 100 * (i * t).sum(-1)
        ours = reward(as_tensor(pil), PROMPTS)
    assert torch.allclose(ours, ref, atol=0.05)


def test_missing_model_is_a_one_line_error(tmp_path):
    with pytest.raises(rewards.RewardError, match="clip: could not load the CLIP model.*HF_HUB_OFFLINE"):
        rewards.build("clip", pretrained=str(tmp_path / "absent"))
    with pytest.raises(rewards.RewardError, match="no architecture"):
        rewards.build("clip", pretrained=None, open_clip_arch="ViT-Q-99")


def test_token_cache_returns_the_tokenizer_output_and_stays_bounded():
    from rewards.clip_towers import TokenCache

    tok = clip_tokenizer()
    calls = []
    cache = TokenCache(lambda p: calls.append(p) or tok(p, padding=True, return_tensors="pt"), max_entries=2)
    a = cache(["a cat", "a dog"])
    assert torch.equal(
        a["input_ids"], tok(["a cat", "a dog"], padding=True, return_tensors="pt")["input_ids"]
    )
    assert cache(["a cat", "a dog"]) is a and len(calls) == 1
    cache(["b"]), cache(["c"])
    assert len(cache.entries) <= 2
