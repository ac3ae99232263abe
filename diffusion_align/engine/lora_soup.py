"""LoRA soups (rewarded soups): one diffusers-format LoRA whose weight change is the weighted sum of several.

A LoRA changes a layer's weight by `delta_i = s_i B_i A_i` (A: down, rank x in; B: up, out x rank; scale
`s_i = lora_alpha / r`). Averaging the A's and the B's separately is not averaging the deltas: with two
adapters, `(wA B_1 + (1-w) B_2)(w A_1 + (1-w) A_2)` has cross terms `B_1 A_2`, `B_2 A_1` that neither adapter
learnt. The soup instead stacks the ranks:

    A = [A_1; A_2; ...]  (sum of ranks x in)      B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]  (out x sum of ranks)

so that `B A = sum_i w_i s_i B_i A_i` exactly, saved with `lora_alpha = r = sum of ranks` (scale 1):
plain diffusers (`pipe.load_lora_weights(dir)`) applies exactly the weighted sum of the deltas. Adapters with
weight 0 are left out (weights (1, 0) give back the first adapter: the same tensors when its alpha equals its
rank). The adapters must come from one base model and adapt the same layers with the same widths.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffusion_align.engine.lora_files import WEIGHTS, record_base, recorded_base
from diffusion_align.errors import UserError

METADATA = "lora_adapter_metadata"  # diffusers' safetensors metadata key: the LoraConfig, keys "<prefix>.r"
# (down, up) key suffixes: diffusers' SD naming, and peft's (SD3/FLUX transformers keep peft's names)
PAIRS = ((".lora.down.weight", ".lora.up.weight"), (".lora_A.weight", ".lora_B.weight"))


class Adapter:
    """One saved LoRA folder: its tensors, its LoraConfig metadata (or {}), the base model it records."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        path = self.directory / WEIGHTS
        if not path.is_file():
            raise UserError(f"soup: {self.directory} holds no {WEIGHTS} (pass a run's lora/ folder)")
        with safe_open(str(path), framework="pt") as f:
            self.tensors = {k: f.get_tensor(k) for k in f.keys()}
            self.metadata = json.loads((f.metadata() or {}).get(METADATA, "{}"))
        self.base = recorded_base(self.directory)
        self.prefix = next(iter(self.tensors), "unet.").split(".", 1)[0]

    def setting(self, name: str, default=None):
        return self.metadata.get(f"{self.prefix}.{name}", default)

    def layers(self) -> dict[str, tuple[str, str]]:
        """{layer path: (down key, up key)}; a one-line error for keys a soup cannot stack."""
        found = {}
        for key in self.tensors:
            pair = next(((d, u) for d, u in PAIRS if key.endswith(d)), None)
            if pair is not None:
                layer = key[: -len(pair[0])]
                found[layer] = (key, layer + pair[1])
            elif not any(key.endswith(u) for _, u in PAIRS):
                raise UserError(f"soup: {self.directory} has {key}, which is not a LoRA down/up weight")
        return found

    def scale(self) -> float:
        """lora_alpha / r (1 without metadata: diffusers' default alpha = rank)."""
        if self.setting("use_rslora") or self.setting("use_dora") or self.setting("rank_pattern"):
            raise UserError(
                f"soup: {self.directory} uses rsLoRA, DoRA or per-layer ranks, which soups do not support"
            )
        if self.setting("alpha_pattern"):
            raise UserError(f"soup: {self.directory} has per-layer alphas, which soups do not support")
        r = self.setting("r")
        return float(self.setting("lora_alpha", r)) / float(r) if r else 1.0


def soup(adapters: list[Adapter], weights: list[float]) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of the LoRA whose delta is sum_i weights[i] * delta_i (see the module doc)."""
    if len(adapters) != len(weights):
        raise UserError(f"soup: {len(adapters)} adapters but {len(weights)} weights; give one weight each")
    check_compatible(adapters)
    used = [(a, w) for a, w in zip(adapters, weights, strict=True) if w != 0]
    if not used:
        raise UserError("soup: every weight is 0; give at least one adapter a non-zero weight")
    tensors: dict[str, torch.Tensor] = {}
    for down_key, up_key in used[0][0].layers().values():
        downs = [a.tensors[down_key].float() for a, _ in used]
        ups = [w * a.scale() * a.tensors[up_key].float() for a, w in used]
        tensors[down_key] = torch.cat(downs, dim=0).contiguous()
        tensors[up_key] = torch.cat(ups, dim=1).contiguous()
    first = used[0][0]
    rank = sum(int(a.tensors[next(iter(a.layers().values()))[0]].shape[0]) for a, _ in used)
    metadata = dict(first.metadata)
    metadata.update({f"{first.prefix}.r": rank, f"{first.prefix}.lora_alpha": float(rank)})
    if not first.metadata:  # no LoraConfig recorded: what diffusers needs to rebuild one
        targets = sorted({layer.rsplit(".", 1)[-1] for layer in first.layers()})
        metadata[f"{first.prefix}.target_modules"] = targets
    return tensors, metadata


def check_compatible(adapters: list[Adapter]) -> None:
    """One-line UserError unless every adapter has one base model, the same layers and the same widths."""
    first = adapters[0]
    layers = first.layers()
    for other in adapters[1:]:
        if first.base and other.base and first.base != other.base:
            raise UserError(
                f"soup: {first.directory} was trained on {first.base} and {other.directory} on {other.base}; "
                "a soup mixes LoRAs of one base model"
            )
        theirs = other.layers()
        if theirs.keys() != layers.keys():
            layer = sorted(set(layers) ^ set(theirs))[0]
            raise UserError(
                f"soup: {first.directory} and {other.directory} adapt different layers (e.g. {layer}); "
                "train both with the same lora.target_modules"
            )
        for layer, (down, up) in layers.items():
            a, b = first.tensors, other.tensors
            if a[down].shape[1:] != b[down].shape[1:] or a[up].shape[:1] + a[up].shape[2:] != (
                b[up].shape[:1] + b[up].shape[2:]
            ):
                raise UserError(
                    f"soup: {layer} has other shapes in {first.directory} ({tuple(a[down].shape)}) and "
                    f"{other.directory} ({tuple(b[down].shape)}): the LoRAs belong to different models"
                )


def write_soup(directories: list[str | Path], weights: list[float], out: str | Path) -> Path:
    """Write the soup of the LoRA folders `directories` with `weights` into `out` (diffusers format, with
    base_model.json when the adapters record one); returns `out`."""
    from safetensors.torch import save_file

    adapters = [Adapter(d) for d in directories]
    tensors, metadata = soup(adapters, [float(w) for w in weights])
    out = Path(out)
    if any(out.resolve() == a.directory.resolve() for a in adapters):
        raise UserError(f"soup: -o {out} is one of the input LoRAs; write the soup to another folder")
    if out.exists() and any(out.iterdir()) and not (out / WEIGHTS).is_file():
        raise UserError(f"soup: -o {out} is a non-empty folder without a LoRA; choose a new or empty folder")
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt", METADATA: json.dumps(metadata)})
    base = next((a.base for a in adapters if a.base), None)
    if base is not None:
        record_base(out, base)
    return out
