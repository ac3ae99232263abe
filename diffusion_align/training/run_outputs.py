"""What a finished run leaves besides its LoRA: the reward curve, the guard's proxy-vs-gold curve and, on
request, the merged pipeline."""

from __future__ import annotations

from pathlib import Path


def plot_reward_curve(history: list[dict], eval_before: dict | None, title: str, path: Path) -> Path:
    """Train reward per epoch and eval reward (before, every eval_every epochs, after) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["epoch"], h["train_reward"]) for h in history if "train_reward" in h]
    evals = [(0, eval_before["reward"])] if eval_before else []
    evals += [(h["epoch"], h["eval_reward"]) for h in history if "eval_reward" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train reward (mean over samples)")
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval reward (held-out prompts, fixed seeds)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reward")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_guard_curve(guard, path: Path) -> Path:
    """The optimised proxy and the held-out gold metric at every evaluation (two y axes), the best gold
    marked, and where the run stopped early if it did."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in guard.history]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(epochs, [h["proxy"] for h in guard.history], "o-", color="tab:blue")
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"proxy: eval {guard.proxy} (optimised)", color="tab:blue")
    gold = ax.twinx()
    gold.plot(epochs, [h["gold"] for h in guard.history], "s-", color="tab:red")
    gold.set_ylabel(f"gold: {guard.gold} (held out)", color="tab:red")
    if guard.best:
        gold.axvline(
            guard.best["epoch"], color="tab:red", ls=":", label=f"best gold (epoch {guard.best['epoch']})"
        )
        gold.legend(loc="lower right")
    if guard.stop_reason and epochs:
        ax.axvline(epochs[-1], color="black", ls="--")
        ax.set_title(f"stopped early at epoch {epochs[-1]}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def export_merged(backbone, directory: Path) -> Path:
    """The LoRA merged into the UNet, saved as a full diffusers pipeline (removes the adapter here)."""
    unet = backbone.unet
    if hasattr(unet, "fuse_lora"):  # diffusers' PeftAdapterMixin: peft's merge of every LoRA layer
        unet.fuse_lora()
        unet.unload_lora()
    else:  # UNet3DConditionModel (TextToVideoSD) lacks the mixin: the same peft merge and layer removal
        from diffusers.utils import recurse_remove_peft_layers
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in unet.modules():
            if isinstance(module, BaseTunerLayer):
                module.merge()
        recurse_remove_peft_layers(unet)
    backbone.pipe.save_pretrained(directory)
    return directory
