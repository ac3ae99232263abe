"""ImageReward on transformers BLIP: the timm->HF key mapping is exact, and the score follows the recipe."""

import json

import pytest
import torch

import rewards
from rewards import testing as tiny
from rewards.imagereward import (
    MAX_TEXT_LENGTH,
    SCORE_MEAN,
    SCORE_STD,
    blip_vision_config,
    convert_visual_keys,
    load_bert_tokenizer,
)
from rewards.preprocess import clip_preprocess

PROMPTS = ["a red fox in snow", "two cups of tea"]


def test_visual_mapping_reproduces_the_timm_vit():
    """BLIP's visual encoder is a timm-style ViT: the converted BlipVisionModel gives the same tokens."""
    from transformers import BlipVisionModel

    vit = tiny.tiny_blip_vit(seed=1)
    sd = convert_visual_keys(vit.state_dict())
    hf = BlipVisionModel(blip_vision_config(sd)).eval()
    hf.load_state_dict(sd)  # strict: every key mapped, none left over
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(hf(pixel_values=x).last_hidden_state, vit.forward_features(x), atol=1e-5)


def test_tokenizer_gets_imagereward_special_tokens(tmp_path):
    d = tiny.write_tiny_bert_vocab(tmp_path)
    base = len((d / "vocab.txt").read_text().split())
    tok = load_bert_tokenizer(d)
    # as bert-base-uncased's 30522 -> 30524 in ImageReward: [DEC] and [ENC] appended, in that order
    assert len(tok) == base + 2 and tok.bos_token == "[DEC]"
    assert tok.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [base, base + 1]
    assert tok.tokenize("[ENC] a") == ["[ENC]", "a"]  # special: never split
    ids = tok(["a cat"], padding="max_length", truncation=True, max_length=MAX_TEXT_LENGTH)["input_ids"][0]
    assert len(ids) == MAX_TEXT_LENGTH and ids[0] == tok.cls_token_id  # [CLS] is kept, not replaced by [ENC]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny.save_tiny_imagereward(tmp_path_factory.mktemp("ir"))


def test_score_follows_the_reference_recipe(checkpoint):
    """Recompute the score from the raw checkpoint with the timm ViT and the original formula."""
    from transformers import BlipTextModel

    from rewards.imagereward import RewardMLP, blip_text_config

    reward = rewards.build("imagereward", pretrained=checkpoint)
    sd = torch.load(checkpoint / "ImageReward.pt", weights_only=True)
    med = json.loads((checkpoint / "med_config.json").read_text())
    vit = tiny.tiny_blip_vit(seed=123)
    vit.load_state_dict({k[len("blip.visual_encoder.") :]: v for k, v in sd.items() if "visual_encoder" in k})
    text = BlipTextModel(blip_text_config(med, 64), add_pooling_layer=False).eval()
    text_sd = {k[len("blip.text_encoder.") :]: v for k, v in sd.items() if "text_encoder" in k}
    text.load_state_dict({k: v for k, v in text_sd.items() if "position_ids" not in k})
    mlp = RewardMLP(med["hidden_size"]).eval()
    mlp.load_state_dict({k[len("mlp.") :]: v for k, v in sd.items() if k.startswith("mlp.")})
    tok = load_bert_tokenizer(checkpoint)

    x = torch.rand(2, 3, 40, 52)
    with torch.no_grad():
        image_embeds = vit.forward_features(clip_preprocess(x, 32))
        t = tok(PROMPTS, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
        hidden = text(
            input_ids=t["input_ids"],
            attention_mask=t["attention_mask"],
            encoder_hidden_states=image_embeds,
            encoder_attention_mask=torch.ones(image_embeds.shape[:2], dtype=torch.long),
            is_decoder=False,
        ).last_hidden_state
        expected = (mlp(hidden[:, 0]).squeeze(-1) - SCORE_MEAN) / SCORE_STD
        ours = reward(x, PROMPTS)
    assert torch.allclose(ours, expected, atol=1e-5)
    # the prompt matters (cross-attention text encoder), so scores differ across prompts
    with torch.no_grad():
        assert not torch.allclose(reward(x, ["zzz", "zzz"]), ours)


def test_checkpoint_file_path_and_errors(checkpoint, tmp_path):
    r = rewards.build("imagereward", pretrained=checkpoint / "ImageReward.pt")
    assert r(torch.rand(1, 3, 32, 32), ["a"]).shape == (1,)
    torch.save({"mlp.layers.0.weight": torch.zeros(2, 2)}, tmp_path / "ImageReward.pt")
    (tmp_path / "med_config.json").write_text((checkpoint / "med_config.json").read_text())
    with pytest.raises(rewards.RewardError, match="no blip.visual_encoder"):
        rewards.build("imagereward", pretrained=tmp_path)
    (tmp_path / "med_config.json").unlink()
    with pytest.raises(rewards.RewardError, match="has no med_config.json"):
        rewards.build("imagereward", pretrained=tmp_path)
