"""The policy: a backbone's denoiser with a LoRA adapter, scored as its sampler's Gaussian transitions.

LoRA goes in through diffusers' `add_adapter(LoraConfig)`, so what we save is the diffusers LoRA format and
loads in plain diffusers with `pipe.load_lora_weights(dir)`. The frozen base model is the reference policy:
`reference()` disables the adapter instead of keeping a second copy of the UNet.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from torch import Tensor

from diffusion_align.engine.lora_files import check_lora_fits, record_base
from diffusion_align.errors import UserError

ADAPTER = "default"


class Policy:
    def __init__(
        self,
        backbone,
        sampler,
        rank: int = 4,
        alpha: float | None = None,
        dropout: float = 0.0,
        target_modules: tuple[str, ...] | list[str] | None = None,
    ):
        """target_modules: None = the backbone's `lora_targets`."""
        self.backbone, self.sampler = backbone, sampler
        self.lora_config = lora_config(rank, alpha, dropout, target_modules or backbone.lora_targets)
        add_lora(backbone.unet, self.lora_config)
        for p in self.parameters():  # fp32 master weights even when the base model is fp16/bf16
            p.data = p.data.float()

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.backbone.unet.parameters() if p.requires_grad]

    def named_parameters(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in self.backbone.unet.named_parameters() if p.requires_grad)

    def transition(
        self, x_t: Tensor, t: Tensor, embeds, guidance_scale: float, num_steps: int, eta: float | None = None
    ):
        """(mean, std) of p_theta(x_prev | x_t); t is a timestep or (B,) timesteps; eta: the step's noise
        level (None: the sampler's)."""
        t_in = t.to(x_t.device)
        if t_in.ndim == 1 and guidance_scale > 1.0 and embeds.uncond is not None:
            t_in = torch.cat([t_in, t_in])  # the CFG batch is [uncond, cond]
        out = self.backbone.predict(x_t, t_in, embeds, guidance_scale)
        return self.sampler.transition(out, t, x_t, num_steps, eta)

    def denoiser_output(self, x_t: Tensor, t: Tensor, embeds) -> Tensor:
        """The conditional denoiser output (no guidance) at a forward-process x_t and t ((B,), one per
        sample): what the denoising objectives (Diffusion-DPO, reward-filtered SFT) compare with a target."""
        return self.backbone.predict(x_t, t.to(x_t.device), embeds, 1.0)

    def log_prob(
        self, x_t: Tensor, x_prev: Tensor, t: Tensor, embeds, guidance_scale: float, num_steps: int
    ) -> Tensor:
        """log p_theta(x_prev | x_t) per sample, (B,) float32, differentiable in the LoRA weights."""
        mean, std = self.transition(x_t, t, embeds, guidance_scale, num_steps)
        return self.sampler.log_prob(x_prev, mean, std)

    @contextmanager
    def weights(self, params: list[Tensor]):
        """Run with the LoRA weights `params` (a snapshot of `parameters()`, e.g. an old policy) inside the
        block; the current weights come back after it. No graph may hold the weights across the swap."""
        current = [p.detach().clone() for p in self.parameters()]
        try:
            with torch.no_grad():
                for p, o in zip(self.parameters(), params, strict=True):
                    p.copy_(o)
            yield
        finally:
            with torch.no_grad():
                for p, c in zip(self.parameters(), current, strict=True):
                    p.copy_(c)

    @contextmanager
    def reference(self):
        """Run the frozen base model (adapter disabled) inside the block."""
        unet = self.backbone.unet
        _enable_adapters(unet, False)
        try:
            yield
        finally:
            _enable_adapters(unet, True)

    # --- diffusers LoRA format ----------------------------------------------------------------------
    def lora_state_dict(self) -> dict[str, Tensor]:
        from diffusers.utils import convert_state_dict_to_diffusers

        state = get_peft_model_state_dict(self.backbone.unet, adapter_name=ADAPTER)
        if self.backbone.lora_prefix != "unet":
            # transformer loaders (SD3, FLUX) read peft's lora_A/lora_B names, as diffusers' DiT scripts save
            # them; converting would rename only the to_q/k/v/out keys, which SD3's loader then drops
            return state
        return convert_state_dict_to_diffusers(state)

    def save_lora(
        self, directory: str | Path, is_main_process: bool = True, base_model: str | None = None
    ) -> Path:
        """Write `pytorch_lora_weights.safetensors` (loadable with `pipe.load_lora_weights(directory)`), and
        `base_model.json` naming `base_model` so that loading onto another model fails clearly."""
        directory = Path(directory)
        prefix = self.backbone.lora_prefix  # "unet", or "transformer" for DiT families
        type(self.backbone.pipe).save_lora_weights(
            directory,
            is_main_process=is_main_process,
            safe_serialization=True,
            **{
                f"{prefix}_lora_layers": {
                    k: v.detach().cpu().contiguous() for k, v in self.lora_state_dict().items()
                },
                f"{prefix}_lora_adapter_metadata": self.lora_config.to_dict(),
            },
        )
        if base_model is not None and is_main_process:
            record_base(directory, base_model)
        return directory

    def load_lora(self, directory: str | Path, model: str | None = None) -> None:
        """Load weights saved by `save_lora` into this policy's adapter (used for resume and evaluation).
        `model` (the base model id) is compared with the one recorded beside the LoRA, if any."""
        from diffusers.utils import convert_unet_state_dict_to_peft

        directory = Path(directory)
        if not (directory / "pytorch_lora_weights.safetensors").is_file():
            raise UserError(
                f"no LoRA at {directory}: expected {directory / 'pytorch_lora_weights.safetensors'}"
            )
        prefix = f"{self.backbone.lora_prefix}."
        check_lora_fits(directory, self.backbone.unet, model, flag="LoRA", prefix=prefix)
        state = type(self.backbone.pipe).lora_state_dict(str(directory))
        state = state[0] if isinstance(state, tuple) else state  # SD's loader adds network alphas
        state = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(
            self.backbone.unet, convert_unet_state_dict_to_peft(state), adapter_name=ADAPTER
        )
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise UserError(
                f"LoRA at {directory} does not fit this model: unexpected keys such as {unexpected[0]}"
            )
        for p in self.parameters():
            p.data = p.data.float()


def lora_config(rank: int, alpha: float | None, dropout: float, target_modules) -> LoraConfig:
    """The policy's LoRA: alpha None = rank (scale 1); also what the memory planner attaches."""
    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",  # B = 0: the policy starts exactly at the base model
        target_modules=list(target_modules),
    )


# UNet3DConditionModel (TextToVideoSD) lacks diffusers' PeftAdapterMixin; peft attaches the same LoRA layers
# to any module, so these two helpers give it the add/enable/disable behaviour the mixin gives other UNets.
def add_lora(unet: torch.nn.Module, config: LoraConfig) -> None:
    if hasattr(unet, "add_adapter"):
        unet.add_adapter(config, adapter_name=ADAPTER)
        return
    from peft import inject_adapter_in_model

    inject_adapter_in_model(config, unet, ADAPTER)
    unet.peft_config = {ADAPTER: config}  # read by get_peft_model_state_dict


def _enable_adapters(unet: torch.nn.Module, enabled: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in unet.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)
