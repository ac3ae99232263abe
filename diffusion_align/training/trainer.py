"""The one training loop: collect with the current policy, update the LoRA, log, evaluate, checkpoint.

    from diffusion_align.builder import train   # build_run(config), then Trainer(run).run()
    summary = train(config)   # {"eval_before", "eval_after", "epochs", "seconds", "run_dir", ...}

The trainer receives built objects and plain options (`training_run`) and imports no config module.
Works alone (`diffusion-align train CONFIG`) and under `accelerate launch`. Conventions:
- `train.samples_per_epoch` and `train.batch_size` are global: every process collects and trains on
  `/ world_size` of them; process r owns global samples r*n .. (r+1)*n-1 of an epoch.
- Randomness is derived, not carried (`epoch_draws`): the same samples whatever the number of processes.
- Gradient accumulation follows the strategy's plan: `loss * weight` per micro-batch, one optimizer step per
  plan step. The UNet is not wrapped in DDP (the backbone calls it directly, and a strategy may run several
  forwards per backward); the LoRA gradients of a step are averaged across processes with one all-reduce
  after its last micro-batch, which is exactly what DDP's `no_sync` on all but the last micro-batch does.
- A non-finite reward or loss stops the run with a one-line UserError before anything is saved, so the last
  checkpoint stays the last good one.
- One run per folder (`run_folder`, decided by the builder): a non-empty output_dir is refused unless
  resumed or overwritten, and nothing is written there before everything the config names has been
  built. A resume falls back past damaged checkpoints and refuses config changes that alter the math
  (`config.changes`).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from diffusion_align.engine.sharding import is_sharded, resident_bytes
from diffusion_align.errors import UserError, warn
from diffusion_align.training import run_checkpoint
from diffusion_align.training.across_processes import (
    equal_micro_counts,
    mean_dicts,
    mean_over_processes,
    reward_metrics,
)
from diffusion_align.training.epoch_draws import epoch_prompts, plan_generator, sample_generators
from diffusion_align.training.evaluation import evaluate
from diffusion_align.training.optimizer_step import optimizer_step
from diffusion_align.training.run_outputs import export_merged, plot_guard_curve, plot_reward_curve
from diffusion_align.training.tracking import Tracker
from diffusion_align.training.training_run import TrainingRun


class Trainer:
    """The epochs of one run, on the objects `builder.build_run` made (a `training_run.TrainingRun`)."""

    def __init__(self, run: TrainingRun):
        self.accelerator, self.group, self.options = run.accelerator, run.group, run.options
        self.backbone, self.policy, self.strategy = run.backbone, run.policy, run.strategy
        self.reward, self.eval_reward = run.reward, run.eval_reward
        self.optimizer, self.scheduler, self.folder = run.optimizer, run.scheduler, run.folder
        self.train_prompts, self.eval_prompts = run.train_prompts, run.eval_prompts
        self.guard, self.diversity = run.guard, run.diversity
        acc, o = self.accelerator, self.options
        self.rank, self.world, self.is_main = acc.process_index, acc.num_processes, acc.is_main_process
        self.local_samples, self.local_batch = o.samples_per_epoch // self.world, o.batch_size // self.world
        self.run_dir = o.output_dir
        self.ckpt_root = self.run_dir / "checkpoints"
        self.params = self.policy.parameters()
        self.sharded = is_sharded(self.backbone.unet)
        self.epoch = self.global_step = 0
        self.seconds_before = 0.0
        self.eval_before: dict[str, float] | None = None
        self.history: list[dict] = []  # per-epoch train/eval reward for the curve
        if self.folder.start.resume_from is not None:
            self._load(self.folder.start.resume_from)
        if self.is_main:  # everything the config names is built
            self.folder.write_start()
        # Ours, not accelerate's init_trackers/log: those write TensorBoard/wandb only, while metrics.jsonl
        # (cut back to the checkpoint on resume) is the run's record that resume and the tests read.
        self.tracker = Tracker(
            self.run_dir,
            tensorboard=o.tensorboard,
            wandb=o.wandb,
            wandb_project=o.wandb_project,
            config=o.config_dict,
            enabled=self.is_main,
            resume_epoch=None if self.folder.start.event == "start" else self.epoch,
        )

    # --- the loop -----------------------------------------------------------------------------------
    def run(self) -> dict:
        o, start = self.options, time.perf_counter()
        self.clock = lambda: self.seconds_before + time.perf_counter() - start
        if self.eval_before is None:
            self.eval_before, scores = self.evaluate("before")
            self.watch(self.eval_before, scores)
        bar = tqdm(
            range(self.epoch, o.epochs),
            desc="epochs",
            initial=self.epoch,
            total=o.epochs,
            disable=not (self.is_main and o.progress),
        )
        for epoch in bar:
            metrics = self.train_epoch(epoch)
            self.epoch = epoch + 1
            last = self.epoch == o.epochs
            every = o.eval_every
            record = {"epoch": self.epoch, "train_reward": metrics["reward/mean"]}
            best = stop = False
            if every and self.epoch % every == 0 and not last:
                evaluation, _ = self.evaluate(f"epoch_{self.epoch:04d}")
                metrics.update({f"eval/{k}": v for k, v in evaluation.items()})
                record["eval_reward"] = evaluation["reward"]
                best = self.watch(evaluation, save_best=False)
                metrics.update(self.guard_metrics())
                stop = self.guard is not None and self.guard.stop_reason is not None
            self.history.append(record)
            if self.epoch % max(1, o.log_every) == 0 or last or stop:
                self.tracker.log(metrics, self.epoch, self.global_step)
            bar.set_postfix(reward=f"{metrics['reward/mean']:.4g}")
            if best:  # after the history and the logs, as a checkpoint of this epoch holds them
                self.save_best()
            if self.epoch % max(1, o.checkpoint_every) == 0 or last or stop:
                self.save_checkpoint(self.clock())
            if stop:
                if self.is_main:
                    print(f"diffusion-align: early stop at epoch {self.epoch}: {self.guard.stop_reason}")
                break
        eval_after, _ = self.evaluate("after")
        if self.guard is None or self.guard.last_epoch != self.epoch:  # not re-judged after a stop
            self.watch(eval_after)
        self.history.append({"epoch": self.epoch, "eval_reward": eval_after["reward"]})
        self.tracker.log({f"eval/{k}": v for k, v in eval_after.items()}, self.epoch, self.global_step)
        return self.finish(eval_after, self.clock())

    def train_epoch(self, epoch: int) -> dict[str, float]:
        o, acc = self.options, self.accelerator
        epoch_start = time.perf_counter()
        unet = self.backbone.unet
        unet.eval()
        self.reward.take()
        with torch.no_grad(), acc.autocast():
            prompts = epoch_prompts(
                self.train_prompts, o.seed, epoch, o.samples_per_epoch, self.rank, self.local_samples
            )
            gens = sample_generators(o.seed, epoch, self.rank, self.local_samples, acc.device)
            batch = self.strategy.collect(prompts, gens)
        recorded = self.reward.take()
        if "reward" in batch:
            recorded["total"] = batch["reward"].detach().float().flatten()
        metrics = reward_metrics(recorded, self.group, epoch)
        metrics.update(mean_over_processes(batch.get("metrics", {}), self.group, self.world))
        unet.train()
        step_metrics: list[dict[str, float]] = []
        grad_norms = []
        total_steps = fillers = 0
        for inner in range(getattr(self.strategy, "num_inner_epochs", 1)):
            plan_gen = plan_generator(o.seed, epoch, inner, self.rank)
            plan = self.strategy.plan(batch, self.local_batch, o.micro_batch_size, plan_gen)
            steps = tqdm(
                plan,
                desc=f"epoch {epoch + 1} updates",
                leave=False,
                disable=not (self.is_main and o.progress),
            )
            for step_index, micros in enumerate(steps):
                if self.sharded:
                    micros, added = equal_micro_counts(micros, self.strategy, self.group, acc.device)
                    fillers += added
                grad_norms.append(self.optimizer_step(micros, epoch, step_index, step_metrics))
                total_steps += 1
        unet.eval()
        if total_steps == 0:
            raise UserError(
                f"epoch {epoch + 1}: the strategy planned no optimizer step; check train.batch_size="
                f"{o.batch_size} against train.samples_per_epoch={o.samples_per_epoch}"
            )
        seconds = time.perf_counter() - epoch_start
        metrics.update(mean_over_processes(mean_dicts(step_metrics), self.group, self.world))
        if self.sharded:  # weight-0 micro-batches that kept the processes' denoiser calls equal
            metrics["shard/filler_micro_batches"] = float(
                self.group.gather(torch.tensor([fillers], device=acc.device)).sum().item()
            )
        metrics.update(
            {
                "train/grad_norm": float(np.mean(grad_norms)),
                "train/lr": self.scheduler.get_last_lr()[0],
                "train/optimizer_steps": float(total_steps),
                "time/epoch_seconds": seconds,
                "time/samples_per_second": o.samples_per_epoch / seconds,
            }
        )
        return metrics

    def optimizer_step(self, micros: list[dict], epoch: int, step_index: int, sink: list) -> float:
        norm = optimizer_step(
            self.strategy, micros, self.accelerator, self.params, self.optimizer, self.scheduler,
            self.options.max_grad_norm, epoch, step_index, sink,
        )  # fmt: skip
        self.global_step += 1
        return norm

    # --- evaluation ---------------------------------------------------------------------------------
    def evaluate(self, name: str) -> tuple[dict[str, float], dict[str, list[float]]]:
        """`evaluation.evaluate` on the main process (grid `samples/<name>.png`): (means, per-image scores);
        every process returns (and checkpoints) the same numbers."""
        result: dict[str, float] = {}
        per_image: dict[str, list[float]] = {}
        # a sharded denoiser runs only when every process calls it: all evaluate, the main one writes
        if (self.is_main or self.sharded) and self.eval_prompts:
            result, path, per_image = evaluate(
                self.policy,
                self.reward,
                self.eval_reward,
                self.eval_prompts,
                self.options.eval,
                self.accelerator.autocast,
                self.run_dir / "samples" / f"{name}.png",
                self.options.progress and self.is_main,
                self.diversity,
                write=self.is_main,
            )
            if self.is_main:
                self.tracker_image(f"samples/{name}", path)
        if self.world > 1:
            from accelerate.utils import broadcast_object_list

            result, per_image = broadcast_object_list([(result, per_image)], from_process=0)[0]
        return result, per_image

    # --- the reward-hacking guard (`guard.Guard`) ---------------------------------------------------------
    def watch(self, evaluation: dict[str, float], scores: dict | None = None, save_best: bool = True) -> bool:
        """Show the guard an evaluation of the current weights; True when its gold is a new best (then,
        with `save_best`, that checkpoint is kept now)."""
        self.warn_collapse(evaluation)
        if self.guard is None or not evaluation:
            return False
        best = self.guard.observe(self.epoch, evaluation, (scores or {}).get(self.guard.gold))
        if best and save_best:
            self.save_best()
        if self.is_main:
            self.guard.write(self.run_dir, best_checkpoint=self.best_dir() and str(self.best_dir()))
        return best

    def warn_collapse(self, evaluation: dict[str, float]) -> None:
        before, now = (self.eval_before or {}).get("diversity"), evaluation.get("diversity")
        fraction = self.options.collapse_fraction
        if self.is_main and None not in (before, now) and evaluation is not self.eval_before:
            if now < fraction * before:
                warn(
                    f"eval diversity {now:.3g} at epoch {self.epoch} is below {fraction:g} x its "
                    f"{before:.3g} before training: the model may be collapsing to one image per prompt"
                )

    def guard_metrics(self) -> dict[str, float]:
        g = self.guard
        if g is None or g.best is None:
            return {}
        return {"guard/best_gold": g.best["gold"], "guard/falling_streak": float(g.streak)}

    def best_dir(self) -> Path | None:
        """The kept best checkpoint (`checkpoint.keep_best`), when the guard has one."""
        if not (self.options.keep_best and self.guard and self.guard.best):
            return None
        return run_checkpoint.best_checkpoint(self.ckpt_root, self.guard.best["epoch"])

    def tracker_image(self, tag: str, path: Path) -> None:
        if getattr(self, "tracker", None) is not None:
            self.tracker.log_image(tag, path, self.global_step)

    # --- checkpoints (`run_checkpoint`: what one holds) -----------------------------------------------
    def save_checkpoint(self, seconds: float) -> Path:
        return run_checkpoint.save(self, seconds)

    def save_best(self) -> Path | None:
        if not self.options.keep_best:
            return None
        return run_checkpoint.save_best(self, self.clock())

    def _load(self, folder: Path) -> None:
        state = run_checkpoint.load(self, folder)
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.seconds_before, self.eval_before = state["seconds"], state["eval_before"]
        self.history = state["history"]
        if self.guard is not None and state.get("guard"):
            self.guard.load_state_dict(state["guard"])
        if self.epoch > self.options.epochs:
            raise UserError(
                f"checkpoint {folder} is at epoch {self.epoch}, past "
                f"train.epochs={self.options.epochs}; raise train.epochs to continue"
            )

    # --- the end ------------------------------------------------------------------------------------
    def finish(self, eval_after: dict[str, float], seconds: float) -> dict:
        flat = torch.cat([p.detach().float().flatten() for p in self.params]).unsqueeze(0)
        every = self.accelerator.gather(flat)
        rank_diff = (every - every[:1]).abs().max().item()
        frozen = torch.tensor([resident_bytes(self.backbone.unet)], device=self.accelerator.device)
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
            "sharded": self.sharded,
            # bytes of frozen denoiser weights each process holds (its shard when sharded)
            "denoiser_bytes_per_process": self.accelerator.gather(frozen).tolist(),
        }
        if self.guard is not None:
            best_dir, final_best = self.best_dir(), self.options.final_best and self.best_dir() is not None
            summary["guard"] = {
                **self.guard.summary(),
                "stopped_early": self.guard.stop_reason if self.epoch < self.options.epochs else None,
                "best_checkpoint": best_dir and str(best_dir),
                "final": "best" if final_best else "last",  # what lora/ holds
            }
            if final_best:  # every process loads the same weights
                self.policy.load_lora(best_dir / "lora", self.options.base_model)
        if self.is_main:
            self.policy.save_lora(self.run_dir / "lora", base_model=self.options.base_model)
            summary["lora_dir"] = str(self.run_dir / "lora")
            plot_reward_curve(
                self.history, self.eval_before, self.options.title, self.run_dir / "reward_curve.png"
            )
            if self.guard is not None:
                plot_guard_curve(self.guard, self.run_dir / "guard_curve.png")
            if self.options.export_merged:
                summary["merged_dir"] = str(export_merged(self.backbone, self.run_dir / "merged"))
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
        self.tracker.close()
        self.accelerator.wait_for_everyone()
        return summary
