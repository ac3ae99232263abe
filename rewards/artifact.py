"""Artifact rewards: 1 means artifact-free, 0 means artifacts.

Two rewards:

- `ArtifactJudge`: the reward of "Understanding Reward Hacking in Text-to-Image Reinforcement Learning"
  (Hong et al., arXiv 2601.03468). Qwen2.5-VL-7B-Instruct is asked the paper's fixed prompt about one
  image; reward = 1 - P(yes), read from the log-probs of the first answer token. Non-differentiable (it
  sees the image as a JPEG, as the paper's judge did), so use it with policy-gradient methods only.
- `ArtifactHead` (rewards/artifact_head.py): this project's own light, differentiable alternative (not
  from the paper): a logistic head on frozen CLIP image embeddings. reward = P(clean).
"""

from __future__ import annotations

import io
import math
import os

import torch

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
