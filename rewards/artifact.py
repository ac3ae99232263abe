"""Artifact rewards: 1 means artifact-free, 0 means artifacts.

Two rewards:

- `ArtifactJudge`: the reward of "Understanding Reward Hacking in Text-to-Image Reinforcement Learning"
  (Hong et al., arXiv 2601.03468). Qwen2.5-VL-7B-Instruct is asked the paper's fixed prompt about one
  image; reward = 1 - P(yes), read from the log-probs of the first answer token. Non-differentiable (it
  sees the image as a JPEG, as the paper's judge did), so use it with policy-gradient methods only.
- `ArtifactHead`: this project's own light, differentiable alternative (not from the paper): a logistic
  head on frozen CLIP image embeddings, trained with `diffusion-align train-artifact-head` on a folder
  of clean and a folder of artifact images. reward = P(clean).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import torch
from torch import nn

from rewards.base import Reward, check_inputs
from rewards.errors import RewardError, load_error

# The final, optimised prompt of the paper's judge (constant PROMPT in yq-hong/ArtifactReward).
PROMPT = (
    "Analyze the images to identify any unintentional digital artifacts, concentrating on irregular "
    "lighting, object placement, blending errors, or anomalies that could affect realism. Disregard any "
    "deliberate artistic styles or intentional surreal elements. Respond with YES if artifacts are "
    "detected; if not, respond with NO."
)
DEFAULT_JUDGE = "Qwen/Qwen2.5-VL-7B-Instruct"
DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def yes_probability(top_ids: list[int], top_logprobs: list[float], decode) -> float:
    """P(yes) from the top-k first-token log-probs, the paper's readout.

    A token counts as "yes" or "no" when its decoded text, lower-cased, is exactly that word.
    P(yes) = 1 / (1 + exp(lp_no - lp_yes)); 0 when no "yes" token is in the top k, 1 when no "no" token
    is (so 0 when neither is). Several spellings of one answer ("YES", "Yes") are summed in probability
    (log-sum-exp); the paper's code kept only one of them, an arbitrary choice among near-zero terms.
    """
    yes, no = [], []
    for token_id, lp in zip(top_ids, top_logprobs, strict=True):
        word = decode(token_id).lower()
        if word == "yes":
            yes.append(lp)
        elif word == "no":
            no.append(lp)
    if not yes:
        return 0.0
    if not no:
        return 1.0
    lp_yes = torch.logsumexp(torch.tensor(yes, dtype=torch.float64), 0).item()
    lp_no = torch.logsumexp(torch.tensor(no, dtype=torch.float64), 0).item()
    return 1.0 / (1.0 + math.exp(lp_no - lp_yes))


def _to_pil(images: torch.Tensor, jpeg_quality: int | None) -> list:
    """`(B, 3, H, W)` in [0, 1] -> PIL RGB images, optionally round-tripped through JPEG."""
    from PIL import Image

    arrays = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
    out = []
    for a in arrays.numpy():
        img = Image.fromarray(a, "RGB")
        if jpeg_quality is not None:
            # The paper's judge received a base64 JPEG at quality 95; reproduce its compression.
            buffer = io.BytesIO()
            img.save(buffer, format="JPEG", quality=jpeg_quality)
            buffer.seek(0)
            img = Image.open(buffer).convert("RGB")
        out.append(img)
    return out


class ArtifactJudge(Reward):
    """Qwen2.5-VL yes/no judge; reward = 1 - P(yes) in [0, 1].

    `forward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` float32. The generation prompts are not
    shown to the judge (as in the paper); only `prompt`, the judging question, is.

    Args:
        model: a `Qwen2_5_VLForConditionalGeneration` (or any transformers VLM with the same call).
        processor: its processor; it must carry the model's chat template.
        prompt: the judging question (default: the paper's optimised prompt).
        top_k: how many first-token log-probs are inspected (the paper requested 10).
        jpeg_quality: JPEG round-trip before judging (95 as in the paper); None sends raw pixels.
    """

    name = "artifact_judge"
    differentiable = False

    def __init__(
        self, model, processor, prompt: str = PROMPT, top_k: int = 10, jpeg_quality: int | None = 95
    ):
        super().__init__()
        if getattr(processor, "chat_template", None) is None:
            raise RewardError(
                "the judge's processor has no chat template; load the processor from the model's "
                "checkpoint directory (it ships chat_template.jinja)"
            )
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        # Left padding keeps every sequence's last real token at position -1 in a batch.
        self.processor.tokenizer.padding_side = "left"
        self.prompt = prompt
        self.top_k = top_k
        self.jpeg_quality = jpeg_quality
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike = DEFAULT_JUDGE,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
        max_pixels: int | None = None,
        **kwargs,
    ) -> ArtifactJudge:
        """Load Qwen2.5-VL from a hub id or a local `save_pretrained` directory (no remote code).

        `max_pixels` caps the image size the processor feeds the vision tower (fewer tokens, less memory).
        dtype defaults to bfloat16 on CUDA and float32 elsewhere.
        """
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration

        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype is None:
            dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        elif isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        where = str(pretrained)
        try:
            proc_kwargs = {} if max_pixels is None else {"max_pixels": int(max_pixels)}
            processor = AutoProcessor.from_pretrained(where, **proc_kwargs)
            model = Qwen2_5_VLForConditionalGeneration.from_pretrained(where, dtype=dtype)
        except (OSError, ValueError) as e:
            raise load_error(cls.name, "the Qwen2.5-VL judge", where, e) from e
        return cls(model.to(device), processor, **kwargs)

    def _inputs(self, images: torch.Tensor):
        messages = [{"role": "user", "content": [{"type": "text", "text": self.prompt}, {"type": "image"}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        pil = _to_pil(images, self.jpeg_quality)
        inputs = self.processor(text=[text] * len(pil), images=pil, return_tensors="pt", padding=True)
        return inputs.to(self.model.device)

    @torch.no_grad()
    def first_token_logprobs(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` in [0, 1] -> `(B, V)` float32 log-probs of the judge's first answer token."""
        logits = self.model(**self._inputs(images)).logits[:, -1, :]
        return torch.log_softmax(logits.float(), dim=-1)

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        check_inputs(images, prompts, self.name)
        logprobs = self.first_token_logprobs(images)
        top = logprobs.topk(min(self.top_k, logprobs.shape[-1]), dim=-1)
        decode = self.processor.tokenizer.decode
        p_yes = [
            yes_probability(ids.tolist(), lps.tolist(), decode)
            for ids, lps in zip(top.indices.cpu(), top.values.cpu(), strict=True)
        ]
        return 1.0 - torch.tensor(p_yes, dtype=torch.float32, device=images.device)


# ---------------------------------------------------------------------------------------------------
# ArtifactHead: a logistic (or one-hidden-layer) head on frozen CLIP image embeddings.

HEAD_FORMAT = "diffusion_align.artifact_head/1"


class LogisticHead(nn.Module):
    """`(N, D)` L2-normalised CLIP image embeddings -> `(N,)` artifact logits (> 0 means artifact).

    Features are standardised with the training set's mean/std (stored as buffers, saved with the head)
    so the optimiser sees unit-scale inputs whatever the backbone.
    """

    def __init__(self, feature_dim: int, hidden: int = 0):
        super().__init__()
        self.feature_dim, self.hidden = feature_dim, hidden
        self.register_buffer("mean", torch.zeros(feature_dim))
        self.register_buffer("std", torch.ones(feature_dim))
        if hidden > 0:
            self.net = nn.Sequential(nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        else:
            self.net = nn.Sequential(nn.Linear(feature_dim, 1))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std).squeeze(-1)


def fit_head(
    features: torch.Tensor,
    labels: torch.Tensor,
    hidden: int = 0,
    steps: int = 500,
    lr: float = 5e-2,
    weight_decay: float = 1e-3,
    seed: int = 0,
) -> LogisticHead:
    """Fit a head on `(N, D)` features and `(N,)` labels in {0 clean, 1 artifact}, full batch.

    The loss is class-balanced (pos_weight = n_clean / n_artifact) so an unbalanced folder pair does not
    just teach the majority label.
    """
    features, labels = features.detach().float(), labels.detach().float()
    gen = torch.Generator().manual_seed(seed)
    head = LogisticHead(features.shape[1], hidden)
    with torch.no_grad():
        for p in head.net.parameters():  # seeded init, independent of the global RNG
            bound = 1.0 / math.sqrt(p.shape[-1])
            p.copy_(torch.empty_like(p).uniform_(-bound, bound, generator=gen))
        head.mean.copy_(features.mean(0))
        head.std.copy_(features.std(0, unbiased=False).clamp_min(1e-6))
    n_pos = labels.sum().clamp_min(1)
    pos_weight = (len(labels) - n_pos).clamp_min(1) / n_pos
    opt = torch.optim.AdamW(head.net.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        loss = nn.functional.binary_cross_entropy_with_logits(head(features), labels, pos_weight=pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return head.eval().requires_grad_(False)


def load_clip(pretrained: str | os.PathLike, name: str = "artifact_head"):
    """A frozen `transformers.CLIPModel` from a hub id or local directory; one-line error on failure."""
    from transformers import CLIPModel

    try:
        return CLIPModel.from_pretrained(str(pretrained)).eval().requires_grad_(False)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise RewardError(
            f"{name}: could not load the CLIP backbone from {str(pretrained)!r} "
            f"({type(e).__name__}: {first}); "
            "pass a local save_pretrained directory (clip=/path, --reward-arg artifact_head.clip=/path, or "
            "--clip /path for train-artifact-head), or point HF_HOME at a cache that has it "
            "(HF_HUB_OFFLINE=1 reads only the cache)"
        ) from e


def clip_image_embeddings(clip, images: torch.Tensor) -> torch.Tensor:
    """`(B, 3, H, W)` in [0, 1] -> `(B, D)` L2-normalised CLIP image embeddings, differentiable."""
    from rewards.preprocess import clip_preprocess

    size = clip.config.vision_config.image_size
    pixels = clip_preprocess(images, size)
    out = clip.get_image_features(pixel_values=pixels)
    out = getattr(out, "pooler_output", out)  # transformers 5 returns a model output, 4 a tensor
    return nn.functional.normalize(out.float(), dim=-1)


class ArtifactHead(Reward):
    """reward = P(clean) = sigmoid(-logit) from a trained head on frozen CLIP image embeddings.

    `forward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)` float32 in [0, 1]; differentiable w.r.t.
    the images (prompts are unused). Train the head with `diffusion-align train-artifact-head`.
    """

    name = "artifact_head"
    differentiable = True

    def __init__(self, clip, head: LogisticHead, clip_source: str = ""):
        super().__init__()
        dim = clip.config.projection_dim
        if head.feature_dim != dim:
            raise RewardError(
                f"artifact head expects {head.feature_dim}-d CLIP embeddings but the backbone gives {dim}-d; "
                "use the CLIP model the head was trained with (`clip=` / --reward-arg artifact_head.clip=...)"
            )
        self.clip = clip.eval().requires_grad_(False)
        self.head = head.eval().requires_grad_(False)
        self.clip_source = clip_source
        self.freeze()

    @classmethod
    def from_pretrained(
        cls,
        pretrained: str | os.PathLike | None = None,
        clip: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
    ) -> ArtifactHead:
        """Load a head file written by `save` (or the train-artifact-head command).

        `clip` overrides the backbone recorded in the file (a hub id or a local directory).
        """
        if pretrained is None:
            raise RewardError(
                "artifact_head needs its trained head file: pass pretrained=FILE.safetensors "
                "(--reward-arg artifact_head.pretrained=FILE); "
                "make one with `diffusion-align train-artifact-head`"
            )
        head, meta = load_head(pretrained)
        clip_source = str(clip) if clip is not None else meta.get("clip", "")
        if not clip_source:
            raise RewardError(
                f"{pretrained} does not record its CLIP backbone; pass clip=<hub id or directory>"
            )
        model = cls(load_clip(clip_source), head, clip_source)
        return model.to(device) if device is not None else model

    def save(self, path: str | os.PathLike, **extra_metadata: str) -> Path:
        return save_head(self.head, path, clip=self.clip_source, **extra_metadata)

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """`(B, 3, H, W)` in [0, 1] -> `(B,)` artifact logits (> 0 means artifact)."""
        return self.head(clip_image_embeddings(self.clip, images))

    def forward(self, images: torch.Tensor, prompts: list[str] | None = None) -> torch.Tensor:
        check_inputs(images, prompts, self.name)
        return torch.sigmoid(-self.logits(images)).float()


def save_head(head: LogisticHead, path: str | os.PathLike, **metadata: str) -> Path:
    """Write the head as safetensors; `metadata` (strings) goes into the file header, e.g. clip=<source>."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"format": HEAD_FORMAT, "feature_dim": str(head.feature_dim), "hidden": str(head.hidden)}
    meta.update({k: str(v) for k, v in metadata.items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_head(path: str | os.PathLike) -> tuple[LogisticHead, dict[str, str]]:
    """Read a head written by `save_head`; returns the head and the file's metadata."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise RewardError(
            f"no artifact head file at {path}; train one with "
            "`diffusion-align train-artifact-head --clean DIR --artifact DIR --out FILE.safetensors`"
        )
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except Exception as e:  # safetensors raises its own error types on a bad header
        raise RewardError(f"{path} is not a readable safetensors file ({e})") from e
    if meta.get("format") != HEAD_FORMAT:
        raise RewardError(
            f"{path} is not an artifact head (format {meta.get('format')!r}, want {HEAD_FORMAT!r})"
        )
    head = LogisticHead(int(meta["feature_dim"]), int(meta["hidden"]))
    head.load_state_dict(tensors)
    return head.eval().requires_grad_(False), meta
