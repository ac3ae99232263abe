"""Artifact rewards on tiny random-initialised real models, loaded from checkpoints in the real layout.

Qwen2.5-VL: there is no offline Qwen2 vocabulary, so the judge's tokenizer is a tiny byte-level BPE
(256 byte symbols + merges that make "YES", "Yes", "yes", "NO", "No", "no" single tokens + the Qwen
special tokens) with a minimal chat template in Qwen's <|im_start|> format. Everything else is the real
`Qwen2_5_VLForConditionalGeneration`, `Qwen2VLImageProcessor` and `Qwen2_5_VLProcessor`, saved with
`save_pretrained` and loaded by `ArtifactJudge.from_pretrained`.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from rewards.artifact import PROMPT, ArtifactJudge, yes_probability
from rewards.artifact_head import ArtifactHead, LogisticHead, fit_head, load_head, save_head
from rewards.errors import RewardError
from rewards.testing import save_tiny_clip

ANSWER_WORDS = ["YES", "Yes", "yes", "NO", "No", "no"]
QWEN_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _byte_symbols() -> list[str]:
    # GPT-2 byte-level alphabet: printable bytes stand for themselves, the rest map to unused code points.
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def tiny_qwen_processor(max_pixels: int = 56 * 56):
    from transformers import Qwen2_5_VLProcessor, Qwen2Tokenizer, Qwen2VLImageProcessor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    vocab = {s: i for i, s in enumerate(_byte_symbols())}
    merges = []
    for word in ANSWER_WORDS:
        for k in range(1, len(word)):
            merges.append((word[:k], word[k]))
            vocab.setdefault(word[: k + 1], len(vocab))
    for s in QWEN_SPECIALS:
        vocab[s] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges)
    tok.add_special_tokens({"additional_special_tokens": QWEN_SPECIALS[1:]})
    images = Qwen2VLImageProcessor(min_pixels=28 * 28, max_pixels=max_pixels)
    return Qwen2_5_VLProcessor(
        image_processor=images,
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def tiny_qwen_model(tok, seed: int = 0):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = tok.convert_tokens_to_ids
    config = Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            # head_dim 16 -> 8 rotary pairs split over (time, height, width)
            rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e6},
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=2,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=32,
            window_size=56,
            fullatt_block_indexes=[1],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


@pytest.fixture(scope="module")
def judge_dir(tmp_path_factory):
    """A tiny Qwen2.5-VL checkpoint written by save_pretrained (model + processor + chat template)."""
    d = tmp_path_factory.mktemp("tiny-qwen2.5-vl")
    processor = tiny_qwen_processor()
    tiny_qwen_model(processor.tokenizer).save_pretrained(d)
    processor.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def judge(judge_dir):
    return ArtifactJudge.from_pretrained(judge_dir, device="cpu")


def _images(b: int, seed: int = 0, size: int = 48) -> torch.Tensor:
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _with_fixed_answer(judge: ArtifactJudge, logits: dict[str, float], rest: float = -30.0):
    """Replace the LM head by one whose first-token logits ignore the input: word -> logit, others `rest`."""
    tok = judge.processor.tokenizer
    vocab = judge.model.lm_head.out_features
    head = nn.Linear(judge.model.lm_head.in_features, vocab, bias=True)
    nn.init.zeros_(head.weight)
    bias = torch.full((vocab,), rest)
    for word, value in logits.items():
        bias[tok.convert_tokens_to_ids(word)] = value
    head.bias.data.copy_(bias)
    judge.model.lm_head = head
    return judge


def test_judge_loads_from_checkpoint_and_scores(judge):
    out = judge(_images(3), ["a cat"] * 3)
    assert out.shape == (3,) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and (out >= 0).all() and (out <= 1).all()
    assert judge.prompt == PROMPT and judge.differentiable is False
    assert type(judge.model).__name__ == "Qwen2_5_VLForConditionalGeneration"


@pytest.mark.parametrize(
    "logits, expected",
    [
        ({"YES": 2.0, "NO": 0.0}, 1 - 1 / (1 + math.exp(-2.0))),  # reward = 1 - sigmoid(lp_yes - lp_no)
        ({"YES": -1.0, "NO": 1.5}, 1 - 1 / (1 + math.exp(2.5))),
        ({"YES": 1.0, "Yes": 1.0, "NO": math.log(2.0)}, 1 - 1 / (1 + math.exp(-1.0))),  # spellings summed
        ({"YES": 5.0}, 0.0),  # "no" not among the top-k -> P(yes) = 1
        ({"no": 5.0}, 1.0),  # "yes" not among the top-k -> P(yes) = 0
    ],
)
def test_judge_yes_no_readout_known_answers(judge_dir, logits, expected):
    judge = _with_fixed_answer(ArtifactJudge.from_pretrained(judge_dir, device="cpu"), logits, rest=-30.0)
    out = judge(_images(2), ["", ""])
    torch.testing.assert_close(out, torch.full((2,), expected), atol=1e-6, rtol=0)


def test_judge_top_k_cut_hides_answers_outside_it(judge_dir):
    # 300 tokens at logit 0 outrank "NO" at -1: with top_k=10 "no" is unseen, so P(yes) = 1 (paper's rule).
    judge = _with_fixed_answer(
        ArtifactJudge.from_pretrained(judge_dir, device="cpu"), {"YES": 3.0, "NO": -1.0}, 0.0
    )
    assert judge(_images(1), [""]).item() == 0.0
    judge.top_k = judge.model.lm_head.out_features  # everything visible: the full two-way readout
    # "Yes"/"yes" and "No"/"no" sit at logit 0 and now count too, summed per answer.
    p_yes = (math.exp(3.0) + 2) / (math.exp(3.0) + 2 + math.exp(-1.0) + 2)
    torch.testing.assert_close(judge(_images(1), [""]), torch.tensor([1 - p_yes]))


def test_judge_readout_matches_manual_forward(judge):
    images = _images(2, seed=3)
    inputs = judge._inputs(images)
    with torch.no_grad():
        manual = torch.log_softmax(judge.model(**inputs).logits[:, -1].float(), -1)
    torch.testing.assert_close(judge.first_token_logprobs(images), manual)
    # The prompt reaches the model: the paper's text is inside the tokenised chat.
    decoded = judge.processor.tokenizer.decode(inputs["input_ids"][0])
    assert PROMPT in decoded and decoded.rstrip().endswith("assistant")


def test_judge_batch_invariance(judge):
    images = _images(3, seed=5)
    batch = judge.first_token_logprobs(images)
    single = torch.cat([judge.first_token_logprobs(images[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batch, single, atol=1e-5, rtol=1e-5)


def test_judge_is_not_differentiable_and_says_so(judge):
    images = _images(2).requires_grad_(True)
    out = judge(images, ["", ""])
    assert judge.differentiable is False
    assert not out.requires_grad


def test_judge_missing_checkpoint_error_says_where_and_how(tmp_path):
    with pytest.raises(RewardError) as e:
        ArtifactJudge.from_pretrained(tmp_path / "nope", device="cpu")
    msg = str(e.value)
    assert str(tmp_path / "nope") in msg and "HF_HUB_OFFLINE" in msg and "\n" not in msg


def test_yes_probability_rules():
    decode = {1: "YES", 2: "NO", 3: " yes", 4: "maybe"}.__getitem__
    assert yes_probability([1, 2], [-0.1, -0.1], decode) == pytest.approx(0.5)
    assert yes_probability([4, 3], [-0.1, -0.2], decode) == 0.0  # " yes" (leading space) is not "yes"
    assert yes_probability([2], [-5.0], decode) == 0.0
    assert yes_probability([1], [-5.0], decode) == 1.0
    assert yes_probability([1, 2], [math.log(0.6), math.log(0.2)], decode) == pytest.approx(0.75)


# ---------------------------------------------------------------------------------------------------
# ArtifactHead


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-clip")
    return save_tiny_clip(d, image_size=32, patch_size=8)


def _trained_head(dim: int = 32, seed: int = 0) -> LogisticHead:
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(40, dim, generator=g)
    labels = (feats[:, 0] > 0).float()
    return fit_head(feats, labels, steps=200)


def test_fit_head_learns_a_separable_rule():
    g = torch.Generator().manual_seed(1)
    feats = torch.randn(200, 16, generator=g)
    labels = (feats[:, 3] - feats[:, 5] > 0).float()
    head = fit_head(feats[:150], labels[:150])
    acc = ((head(feats[150:]) > 0).float() == labels[150:]).float().mean()
    assert acc > 0.9


def test_head_saved_and_loaded_through_real_code(tmp_path, clip_dir):
    from rewards.artifact_head import load_clip

    reward = ArtifactHead(load_clip(clip_dir), _trained_head(), clip_source=str(clip_dir))
    path = reward.save(tmp_path / "head.safetensors", heldout_accuracy="0.9")
    loaded = ArtifactHead.from_pretrained(path)  # backbone from the file's metadata
    images = _images(3, size=40)
    torch.testing.assert_close(loaded(images, [""] * 3), reward(images, [""] * 3))
    head, meta = load_head(path)
    assert meta["clip"] == str(clip_dir) and meta["heldout_accuracy"] == "0.9"
    out = loaded(images, [""] * 3)
    assert out.shape == (3,) and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert ((out > 0) & (out < 1)).all()


def test_head_is_differentiable_and_says_so(clip_dir):
    from rewards.artifact_head import load_clip

    reward = ArtifactHead(load_clip(clip_dir), _trained_head())
    images = _images(2, size=48).requires_grad_(True)
    reward(images, ["", ""]).sum().backward()
    assert reward.differentiable is True
    assert images.grad is not None and images.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in reward.parameters())  # frozen


def test_head_errors(tmp_path, clip_dir):
    from rewards.artifact_head import load_clip

    with pytest.raises(RewardError, match="train-artifact-head"):
        ArtifactHead.from_pretrained(tmp_path / "missing.safetensors")
    with pytest.raises(RewardError, match="16-d"):
        ArtifactHead(load_clip(clip_dir), LogisticHead(16))
    other = save_head(LogisticHead(32), tmp_path / "h.safetensors", format="something-else")
    with pytest.raises(RewardError, match="not an artifact head"):
        load_head(other)


def test_judge_runs_in_bfloat16(judge_dir, judge):
    # The GPU default dtype; pixel values arrive as float32 and must be cast by the model, not by us.
    bf16 = ArtifactJudge.from_pretrained(judge_dir, device="cpu", dtype="bfloat16")
    assert bf16.model.dtype == torch.bfloat16
    images = _images(2, seed=7)
    lp16, lp32 = bf16.first_token_logprobs(images), judge.first_token_logprobs(images)
    assert lp16.dtype == torch.float32 and torch.isfinite(lp16).all()
    assert (lp16 - lp32).abs().max() < 0.1


def test_registry_builds_both_artifact_rewards(judge_dir, clip_dir, tmp_path):
    import rewards

    judge = rewards.build("artifact_judge", pretrained=str(judge_dir), device="cpu", max_pixels=28 * 28)
    assert (
        isinstance(judge, ArtifactJudge) and judge.processor.image_processor.size["longest_edge"] == 28 * 28
    )
    head_file = save_head(LogisticHead(32), tmp_path / "head.safetensors", clip=str(clip_dir))
    head = rewards.build("artifact_head", pretrained=str(head_file))
    assert isinstance(head, ArtifactHead) and head.differentiable
    video = rewards.per_frame(head, "fml")(_images(2, size=32)[:, None].expand(2, 4, 3, 32, 32), ["", ""])
    assert video.shape == (2,) and torch.isfinite(video).all()
    with pytest.raises(RewardError, match="train-artifact-head"):
        rewards.build("artifact_head")
