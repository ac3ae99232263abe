"""The one training loop: collect with the current policy, update the LoRA, log, evaluate, checkpoint.

    from diffusion_align.trainer import train
    summary = train(config)   # {"eval_before", "eval_after", "epochs", "seconds", "run_dir", ...}

Works alone (`diffusion-align train CONFIG`) and under `accelerate launch`. Conventions:
- `train.samples_per_epoch` and `train.batch_size` are global: every process collects and trains on
  `/ world_size` of them; process r owns global samples r*n .. (r+1)*n-1 of an epoch.
- Randomness is derived, not carried: sample j of epoch e draws its noise from its own generator seeded from
  (train.seed, e, j), and the epoch's prompts from (train.seed, e). So noise never repeats across processes
  or epochs, a run gives the same samples whatever the number of processes, and resume is exact.
- Gradient accumulation follows the strategy's plan: `loss * weight` per micro-batch, one optimizer step per
  plan step. The UNet is not wrapped in DDP (the backbone calls it directly, and a strategy may run several
  forwards per backward); the LoRA gradients of a step are averaged across processes with one all-reduce
  after its last micro-batch, which is exactly what DDP's `no_sync` on all but the last micro-batch does.
- A non-finite reward or loss stops the run with a one-line UserError before anything is saved, so the last
  checkpoint stays the last good one.
- One run per folder (`run_folder`): a non-empty output_dir is refused unless resumed or overwritten, and
  nothing is written there before everything the config names has been built. A resume falls back past
  damaged checkpoints and refuses config changes that alter the math (`config_changes`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion_align import checkpointing, run_folder
from diffusion_align.config import save_config, to_dict
from diffusion_align.distributed import AccelerateGroup
from diffusion_align.errors import UserError
from diffusion_align.images import save_grid
from diffusion_align.prompts import load_prompts
from diffusion_align.registry import build_backbone, build_policy, build_reward, custom_components
from diffusion_align.rollout import rollout
from diffusion_align.settings import Config
from diffusion_align.strategies import strategy_class
from diffusion_align.tracking import Tracker

SUPPORTED_DISTRIBUTED = {"NO", "MULTI_CPU", "MULTI_GPU", "MULTI_XPU", "MULTI_NPU", "MULTI_MLU", "MULTI_MUSA"}


def train(config: Config, overwrite: bool = False) -> dict:
    """Fine-tune `config.model` with `config.strategy`; returns the summary also written to summary.json.
    `overwrite`: start over in a non-empty output_dir, deleting its run artifacts (see `run_folder`)."""
    return Trainer(config, overwrite).run()


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from keys (train.seed, epoch, sample index, ...); distinct keys, unrelated seeds."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, dtype=np.uint64)[0] >> 1)


class RecordingReward:
    """The reward as strategies see it, keeping every call's raw components so the trainer can log them."""

    def __init__(self, reward):
        self.reward = reward
        self.differentiable = reward.differentiable
        self.calls: list[dict[str, torch.Tensor]] = []

    def __call__(self, images, prompts):
        total, components = self.reward(images, prompts)
        self.calls.append({"total": total.detach(), **{k: v.detach() for k, v in components.items()}})
        return total, components

    def take(self) -> dict[str, torch.Tensor]:
        """Concatenated records since the last `take`, {"total" | component: (N,)}; empty if no call."""
        calls, self.calls = self.calls, []
        if not calls:
            return {}
        return {k: torch.cat([c[k].float().flatten() for c in calls]) for k in calls[0]}


class Trainer:
    def __init__(self, config: Config, overwrite: bool = False):
        from accelerate import Accelerator

        if config.strategy is None:
            raise UserError("no strategy configured: add `strategy: ddpo` (or d3po, alignprop, draft, prdp)")
        self.config = config
        t = config.train
        # Processes started by torchrun on a machine without CUDA form a CPU (gloo) group only with cpu=True.
        launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
        cpu = config.model.device == "cpu" or (launched and not torch.cuda.is_available())
        self.accelerator = Accelerator(mixed_precision=t.mixed_precision, cpu=cpu)
        acc = self.accelerator
        kind = str(acc.distributed_type).split(".")[-1]
        if kind not in SUPPORTED_DISTRIBUTED:
            raise UserError(
                f"accelerate distributed_type {kind} is not supported by the trainer yet (the LoRA is "
                "replicated and synchronised by the trainer); launch with configs/accelerate/ddp.yaml"
            )
        self.rank, self.world = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        for key, value in (
            ("train.samples_per_epoch", t.samples_per_epoch),
            ("train.batch_size", t.batch_size),
        ):
            if value <= 0 or value % self.world:
                raise UserError(
                    f"{key}={value} must be a positive multiple of the number of processes ({self.world}); "
                    "both are global counts, split evenly over processes"
                )
        if t.samples_per_epoch % t.batch_size:
            raise UserError(
                f"train.samples_per_epoch={t.samples_per_epoch} must be a multiple of "
                f"train.batch_size={t.batch_size} (every optimizer step uses a full batch)"
            )
        self.local_samples = t.samples_per_epoch // self.world
        self.local_batch = t.batch_size // self.world
        self.run_dir = Path(config.output_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.folder_start = run_folder.on_main(acc, lambda: run_folder.check_start(config, overwrite))
        self.resume_from = self.folder_start.resume_from

        torch.manual_seed(derive_seed(t.seed, self.rank, 7))  # dropout etc.; saved with the RNG state
        model = dataclasses.replace(config.model, device=str(acc.device))
        self.backbone = build_backbone(model)
        self.policy = build_policy(self.backbone, config.sample, config.lora)
        self.reward_fn = build_reward(config.rewards, acc.device)
        self.reward = RecordingReward(self.reward_fn)
        self.eval_reward_fn = build_reward(config.eval_rewards, acc.device) if config.eval_rewards else None
        self.group = AccelerateGroup(acc)
        self.strategy = strategy_class(config.strategy)(
            config.strategy, self.policy, self.reward, config.sample, group=self.group
        )
        self.params = self.policy.parameters()
        optimizer = torch.optim.AdamW(
            self.params,
            lr=t.learning_rate,
            betas=tuple(t.adam_betas),
            weight_decay=t.adam_weight_decay,
            eps=t.adam_epsilon,
        )
        # Not passed to accelerate.prepare: its scheduler wrapper steps once per process per step.
        self.scheduler = warmup_schedule(optimizer, t.lr_warmup_steps)
        self.optimizer = acc.prepare(optimizer)  # fp16 loss scaling lives in accelerate's wrapper

        if config.prompts.eval_images_per_prompt < 1:
            raise UserError(
                f"prompts.eval_images_per_prompt={config.prompts.eval_images_per_prompt} must be at least 1"
            )
        self.train_prompts = load_prompts(config.prompts.train)
        self.eval_prompts = [
            prompt
            for prompt in load_prompts(config.prompts.eval)[: config.prompts.eval_count]
            for _ in range(config.prompts.eval_images_per_prompt)
        ]
        self.epoch = self.global_step = 0
        self.seconds_before = 0.0
        self.eval_before: dict[str, float] | None = None
        self.history: list[dict] = []  # per-epoch train/eval reward for the curve
        if self.resume_from is not None:
            self._load(self.resume_from)
        if self.is_main:  # the config is valid: everything it names is built
            run_folder.write_start(config, self.folder_start, custom_components(config))
        # Ours, not accelerate's init_trackers/log: those write TensorBoard/wandb only, while metrics.jsonl
        # (cut back to the checkpoint on resume) is the run's record that resume and the tests read.
        self.tracker = Tracker(
            self.run_dir,
            tensorboard=config.logging.tensorboard,
            wandb=config.logging.wandb,
            wandb_project=config.logging.wandb_project,
            config=to_dict(config),
            enabled=self.is_main,
            resume_epoch=None if self.folder_start.event == "start" else self.epoch,
        )

    # --- the loop -----------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, start = self.config, time.perf_counter()
        if self.eval_before is None:
            self.eval_before = self.evaluate("before")
        bar = tqdm(
            range(self.epoch, cfg.train.epochs),
            desc="epochs",
            initial=self.epoch,
            total=cfg.train.epochs,
            disable=not (self.is_main and cfg.logging.progress),
        )
        for epoch in bar:
            metrics = self.train_epoch(epoch)
            self.epoch = epoch + 1
            last = self.epoch == cfg.train.epochs
            every = cfg.logging.eval_every
            record = {"epoch": self.epoch, "train_reward": metrics["reward/mean"]}
            if every and self.epoch % every == 0 and not last:
                evaluation = self.evaluate(f"epoch_{self.epoch:04d}")
                metrics.update({f"eval/{k}": v for k, v in evaluation.items()})
                record["eval_reward"] = evaluation["reward"]
            self.history.append(record)
            if self.epoch % max(1, cfg.logging.log_every) == 0 or last:
                self.tracker.log(metrics, self.epoch, self.global_step)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.4g}")
            if self.epoch % max(1, cfg.checkpoint.every) == 0 or last:
                self.save_checkpoint(self.seconds_before + time.perf_counter() - start)
        eval_after = self.evaluate("after")
        self.history.append({"epoch": self.epoch, "eval_reward": eval_after["reward"]})
        self.tracker.log({f"eval/{k}": v for k, v in eval_after.items()}, self.epoch, self.global_step)
        seconds = self.seconds_before + time.perf_counter() - start
        return self.finish(eval_after, seconds)

    def epoch_prompts(self, epoch: int) -> list[str]:
        """This process's prompts of `epoch`: the global list is drawn uniformly with replacement (DDPO)."""
        rng = np.random.default_rng(derive_seed(self.config.train.seed, epoch, 1))
        chosen = rng.integers(len(self.train_prompts), size=self.config.train.samples_per_epoch)
        mine = chosen[self.rank * self.local_samples : (self.rank + 1) * self.local_samples]
        return [self.train_prompts[i] for i in mine]

    def sample_generators(self, epoch: int) -> list[torch.Generator]:
        """One noise stream per sample, keyed by its global index in the epoch."""
        first = self.rank * self.local_samples
        return [
            torch.Generator(self.accelerator.device).manual_seed(
                derive_seed(self.config.train.seed, epoch, 2, j)
            )
            for j in range(first, first + self.local_samples)
        ]

    def train_epoch(self, epoch: int) -> dict[str, float]:
        cfg, acc = self.config, self.accelerator
        epoch_start = time.perf_counter()
        unet = self.backbone.unet
        unet.eval()
        self.reward.take()
        with torch.no_grad(), acc.autocast():
            batch = self.strategy.collect(self.epoch_prompts(epoch), self.sample_generators(epoch))
        metrics = self.reward_metrics(batch, epoch)
        metrics.update(self.mean_over_processes(batch.get("metrics", {})))
        unet.train()
        step_metrics: list[dict[str, float]] = []
        grad_norms = []
        total_steps = 0
        for inner in range(getattr(self.strategy, "num_inner_epochs", 1)):
            plan_gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, epoch, 3, inner, self.rank))
            plan = self.strategy.plan(batch, self.local_batch, cfg.train.micro_batch_size, plan_gen)
            steps = tqdm(
                plan,
                desc=f"epoch {epoch + 1} updates",
                leave=False,
                disable=not (self.is_main and cfg.logging.progress),
            )
            for step_index, micros in enumerate(steps):
                grad_norms.append(self.optimizer_step(micros, epoch, step_index, step_metrics))
                total_steps += 1
        unet.eval()
        if total_steps == 0:
            raise UserError(
                f"epoch {epoch + 1}: the strategy planned no optimizer step; check train.batch_size="
                f"{cfg.train.batch_size} against train.samples_per_epoch={cfg.train.samples_per_epoch}"
            )
        seconds = time.perf_counter() - epoch_start
        metrics.update(self.mean_over_processes(_mean_dicts(step_metrics)))
        metrics.update(
            {
                "train/grad_norm": float(np.mean(grad_norms)),
                "train/lr": self.scheduler.get_last_lr()[0],
                "train/optimizer_steps": float(total_steps),
                "time/epoch_seconds": seconds,
                "time/samples_per_second": cfg.train.samples_per_epoch / seconds,
            }
        )
        return metrics

    def optimizer_step(self, micros: list[dict], epoch: int, step_index: int, sink: list) -> float:
        """Accumulate `loss * weight` over the step's micros, sync, clip, step; returns the grad norm."""
        acc = self.accelerator
        self.optimizer.zero_grad(set_to_none=True)
        bad = None
        for i, micro in enumerate(micros):
            with acc.autocast():
                loss, metrics = self.strategy.loss(micro)
            where = f"epoch {epoch + 1}, optimizer step {step_index + 1}, micro-batch {i + 1}"
            if bad is None and not torch.isfinite(loss.detach()).all():
                culprit = next((k for k, v in metrics.items() if not math.isfinite(float(v))), None)
                bad = f"non-finite loss ({float(loss.detach())}) at {where}" + (
                    f"; first non-finite metric: {culprit}" if culprit else ""
                )
            acc.backward(loss * float(micro["weight"]))
            sink.append({"train/loss": float(loss.detach()), **{k: float(v) for k, v in metrics.items()}})
        self.sync_gradients(bad, epoch, step_index)
        norm = acc.clip_grad_norm_(self.params, self.config.train.max_grad_norm)
        norm = float(norm) if norm is not None else float("nan")
        if (
            not math.isfinite(norm) and acc.scaler is None
        ):  # with fp16 loss scaling, inf means "skip this step"
            raise UserError(
                f"non-finite gradient norm at epoch {epoch + 1}, optimizer step {step_index + 1} (metric "
                "train/grad_norm); lower train.learning_rate or raise train.max_grad_norm clipping"
            )
        self.optimizer.step()
        self.scheduler.step()
        self.global_step += 1
        return norm

    def sync_gradients(self, bad: str | None, epoch: int, step_index: int) -> None:
        """Average the LoRA gradients over processes (one all-reduce) and agree on a non-finite loss."""
        # Not accelerate's DDP wrapper + `accumulate`: strategies call the UNet through the backbone, several
        # forwards per backward, which DDP's hooks do not support; this one flat reduce also carries the flag.
        if self.world > 1:
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            flat = torch.cat(
                [g.flatten().float() for g in grads]
                + [torch.tensor([float(bad is not None)], device=grads[0].device)]
            )
            flat = self.accelerator.reduce(flat, reduction="sum")
            any_bad = flat[-1].item() > 0
            offset = 0
            for p, g in zip(self.params, grads, strict=True):
                n = g.numel()
                p.grad = (flat[offset : offset + n] / self.world).view_as(p).to(p.dtype)
                offset += n
            if any_bad and bad is None:
                bad = f"non-finite loss on another process at epoch {epoch + 1}, step {step_index + 1}"
        if bad is not None:
            raise UserError(bad + "; no checkpoint was written over the last good one")

    # --- statistics ---------------------------------------------------------------------------------
    def reward_metrics(self, batch: dict, epoch: int) -> dict[str, float]:
        """Mean/std of the epoch's rewards over all processes, per component; stops on a non-finite value."""
        recorded = self.reward.take()
        if "reward" in batch:
            recorded["total"] = batch["reward"].detach().float().flatten()
        metrics = {}
        for name, values in sorted(recorded.items(), key=lambda kv: kv[0] == "total"):  # components first
            every = self.group.gather(values.to(self.accelerator.device))
            bad = (~torch.isfinite(every)).sum().item()
            if bad:
                what = "total reward" if name == "total" else f"reward component '{name}'"
                raise UserError(
                    f"non-finite reward at epoch {epoch + 1}: {what} has {bad} non-finite values out of "
                    f"{every.numel()}; check the reward model and its inputs (no checkpoint was written)"
                )
            key = "reward" if name == "total" else f"reward/{name}"
            metrics[f"{key}/mean" if name == "total" else key] = every.mean().item()
            if name == "total":
                metrics["reward/std"] = every.std().item() if every.numel() > 1 else 0.0
        return metrics

    def mean_over_processes(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.world == 1:
            return {k: float(v) for k, v in metrics.items()}
        every = self.group.gather_object([{k: float(v) for k, v in metrics.items()}])
        keys = sorted({k for m in every for k in m})
        return {k: float(np.mean([m[k] for m in every if k in m])) for k in keys}

    # --- evaluation ---------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, name: str) -> dict[str, float]:
        """Images of the eval prompts with fixed seeds (image i: sample.seed + i, like `diffusion-align
        sample`), their mean raw reward (no running normalisation), and a captioned grid
        `samples/<name>.png`."""
        s = self.config.sample
        result: dict[str, float] = {}
        if self.is_main and self.eval_prompts:
            backbone, images, parts = self.backbone, [], []
            size = (s.height, s.width) if s.height and s.width else None
            backbone.unet.eval()
            for start in tqdm(
                range(0, len(self.eval_prompts), s.batch_size),
                desc=f"eval {name}",
                leave=False,
                disable=not self.config.logging.progress,
            ):
                prompts = self.eval_prompts[start : start + s.batch_size]
                gens = [
                    torch.Generator(backbone.device).manual_seed(s.seed + start + i)
                    for i in range(len(prompts))
                ]
                with self.accelerator.autocast():
                    embeds = backbone.encode_prompts(
                        prompts, s.negative_prompt, guidance=s.guidance_scale > 1, size=size
                    )
                    x_T = backbone.initial_noise(len(prompts), gens, size)
                    traj = rollout(
                        backbone,
                        self.policy.sampler,
                        embeds,
                        x_T,
                        s.num_steps,
                        s.guidance_scale,
                        s.eta,
                        generator=gens,
                    )
                images.append(traj.images.float().cpu())
                scores = self.reward_fn.components(traj.images.float(), prompts)
                if self.eval_reward_fn is not None:
                    extra = self.eval_reward_fn.components(traj.images.float(), prompts)
                    scores.update({f"extra/{k}": v for k, v in extra.items()})
                parts.append({k: v.cpu() for k, v in scores.items()})
            images = torch.cat(images)
            components = {k: torch.cat([p[k] for p in parts]) for k in parts[0]}
            total = self.reward_fn.raw_total({k: components[k] for k in self.reward_fn.names})
            result = {
                "reward": total.mean().item(),
                **{
                    k if k.startswith("extra/") else f"reward/{k}": v.mean().item()
                    for k, v in components.items()
                },
            }
            bad = [k for k, v in result.items() if not math.isfinite(v)]
            if bad:
                raise UserError(
                    f"non-finite evaluation reward ({bad[0]}) at '{name}'; check the reward model"
                )
            captions = [f"{p} [{r:.3g}]" for p, r in zip(self.eval_prompts, total.tolist(), strict=True)]
            path = save_grid(images, self.run_dir / "samples" / f"{name}.png", captions=captions)
            self.tracker_image(f"samples/{name}", path)
        if self.world > 1:  # every process returns (and checkpoints) the same numbers
            from accelerate.utils import broadcast_object_list

            result = broadcast_object_list([result], from_process=0)[0]
        return result

    def tracker_image(self, tag: str, path: Path) -> None:
        if getattr(self, "tracker", None) is not None:
            self.tracker.log_image(tag, path, self.global_step)

    # --- checkpoints --------------------------------------------------------------------------------
    def save_checkpoint(self, seconds: float) -> Path:
        def write_shared(folder: Path) -> None:
            self.policy.save_lora(folder / "lora", base_model=self.config.model.pretrained)
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), folder / "scheduler.pt")
            torch.save(self.reward_fn.state_dict(), folder / "reward.pt")
            save_config(self.config, folder / "config.yaml")  # what a resume is compared with
            if hasattr(self.strategy, "state_dict"):
                torch.save(self.strategy.state_dict(), folder / "strategy.pt")
            state = {
                "epoch": self.epoch,
                "global_step": self.global_step,
                "seconds": seconds,
                "world_size": self.world,
                "eval_before": self.eval_before,
                "history": self.history,
            }
            (folder / checkpointing.COMPLETE_MARKER).write_text(json.dumps(state, indent=1))

        return checkpointing.save_checkpoint(
            self.ckpt_root,
            self.epoch,
            write_shared,
            lambda folder: checkpointing.save_rng(folder, self.rank),
            self.is_main,
            self.accelerator.wait_for_everyone,
            self.config.checkpoint.keep_last,
        )

    def _load(self, folder: Path) -> None:
        state = json.loads((folder / checkpointing.COMPLETE_MARKER).read_text())
        self.policy.load_lora(folder / "lora", self.config.model.pretrained)
        self.optimizer.load_state_dict(torch.load(folder / "optimizer.pt", weights_only=True))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=True))
        self.reward_fn.load_state_dict(torch.load(folder / "reward.pt", weights_only=True))
        if (folder / "strategy.pt").is_file() and hasattr(self.strategy, "load_state_dict"):
            self.strategy.load_state_dict(torch.load(folder / "strategy.pt", weights_only=True))
        checkpointing.load_rng(folder, self.rank)
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        if self.scheduler.last_epoch == self.global_step:  # saved before warmup_schedule (one step behind)
            self.scheduler.last_epoch += 1
        self.seconds_before = state["seconds"]
        self.eval_before = state["eval_before"]
        self.history = state["history"]
        if self.epoch > self.config.train.epochs:
            raise UserError(
                f"checkpoint {folder} is at epoch {self.epoch}, past "
                f"train.epochs={self.config.train.epochs}; raise train.epochs to continue"
            )

    # --- the end ------------------------------------------------------------------------------------
    def finish(self, eval_after: dict[str, float], seconds: float) -> dict:
        flat = torch.cat([p.detach().float().flatten() for p in self.params]).unsqueeze(0)
        every = self.accelerator.gather(flat)
        rank_diff = (every - every[:1]).abs().max().item()
        summary = {
            "eval_before": self.eval_before.get("reward") if self.eval_before else None,
            "eval_after": eval_after.get("reward"),
            "eval_before_components": self.eval_before,
            "eval_after_components": eval_after,
            "epochs": self.epoch,
            "optimizer_steps": self.global_step,
            "seconds": seconds,
            "run_dir": str(self.run_dir),
            "world_size": self.world,
            "lora_max_rank_difference": rank_diff,  # 0 when every process ended with the same weights
        }
        if self.is_main:
            self.policy.save_lora(self.run_dir / "lora", base_model=self.config.model.pretrained)
            summary["lora_dir"] = str(self.run_dir / "lora")
            self.plot_reward_curve(self.run_dir / "reward_curve.png")
            if self.config.checkpoint.export_merged:
                summary["merged_dir"] = str(self.export_merged(self.run_dir / "merged"))
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.tracker.close()
        self.accelerator.wait_for_everyone()
        return summary

    def plot_reward_curve(self, path: Path) -> Path:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        train = [(h["epoch"], h["train_reward"]) for h in self.history if "train_reward" in h]
        evals = [(0, self.eval_before["reward"])] if self.eval_before else []
        evals += [(h["epoch"], h["eval_reward"]) for h in self.history if "eval_reward" in h]
        fig, ax = plt.subplots(figsize=(6, 4))
        if train:
            ax.plot(*zip(*train, strict=True), label="train reward (mean over samples)")
        if evals:
            ax.plot(*zip(*evals, strict=True), "o-", label="eval reward (held-out prompts, fixed seeds)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("reward")
        ax.set_title(
            f"{type(self.config.strategy).__name__.removesuffix('Config')} on {self.config.model.pretrained}"
        )
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def export_merged(self, directory: Path) -> Path:
        return export_merged(self.backbone, directory)


def warmup_schedule(optimizer, warmup_steps: int):
    """diffusers' constant_with_warmup schedule, started one step in: optimizer step k (from 1) runs at
    min(1, k / warmup_steps) of the learning rate (never a step at 0, full rate from step warmup_steps), as
    this trainer always has; diffusers' own start spends step 1 at rate 0."""
    from diffusers.optimization import get_scheduler

    for group in optimizer.param_groups:  # what a scheduler built with last_epoch >= 0 starts from
        group.setdefault("initial_lr", group["lr"])
    return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup_steps, last_epoch=0)


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


def _mean_dicts(items: list[dict[str, float]]) -> dict[str, float]:
    keys = sorted({k for d in items for k in d})
    return {k: float(np.mean([d[k] for d in items if k in d])) for k in keys}
