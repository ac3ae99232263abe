"""One run per folder: what a training run may find in its output_dir, and what it writes there at start.

- A fresh run needs a missing or empty output_dir. A non-empty one is refused unless the run resumes from a
  checkpoint inside it, or `overwrite` is given. (`resume: latest` in a folder whose run was killed before
  its first checkpoint restarts that run, if the config is the same.)
- `overwrite` deletes the folder's run artifacts (`RUN_ARTIFACTS`), never a file the trainer does not write:
  such a file makes the run refuse instead.
- `check_start` only reads; `write_start` writes, and the trainer calls it (through the `RunFolder` the
  builder hands it) once everything the config names has been built, so a config that fails never touches
  the folder.
- A resume compares the config with the one saved in the checkpoint (`config.changes`), refuses changes that
  alter the math and records the others in `config_history.jsonl`.
- Code named by the config (`package.module:attr`) is listed with its file in `custom_components.json`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import yaml

from diffusion_align.config import changes as config_changes
from diffusion_align.errors import UserError, warn
from diffusion_align.training import checkpointing

# Everything a training run writes into its output_dir (`logs` TensorBoard, `wandb` the wandb client).
RUN_ARTIFACTS = frozenset(
    {
        "config.yaml",
        "config_history.jsonl",
        "custom_components.json",
        "metrics.jsonl",
        "summary.json",
        "reward_curve.png",
        "guard.json",
        "guard_curve.png",
        "checkpoints",
        "logs",
        "samples",
        "lora",
        "merged",
        "wandb",
    }
)
HISTORY = "config_history.jsonl"
CUSTOM = "custom_components.json"


@dataclasses.dataclass
class RunStart:
    """How a run starts in its folder (decided by `check_start`)."""

    event: str  # "start", "resume" or "restart" (resume: latest before any checkpoint)
    resume_from: Path | None = None
    clear: bool = False  # delete the folder's run artifacts first (--overwrite)
    changes: dict = dataclasses.field(default_factory=dict)  # accepted config changes, key -> (old, new)


def check_start(config, overwrite: bool) -> RunStart:
    """Decide how the run starts; reads the folder, writes nothing, raises a UserError when it may not."""
    run_dir = Path(config.output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output_dir {run_dir} is a file; choose a folder (new or empty)")
    root = run_dir / "checkpoints"
    resume = config.checkpoint.resume
    chosen, damaged = checkpointing.resolve_resume(resume, root)
    for path, problem in damaged:
        warn(f"checkpoint {path} is damaged ({problem}); resuming from {chosen.name}")
    inside = chosen is not None and chosen.resolve().parent == root.resolve()
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if overwrite and inside:
        raise UserError(
            f"--overwrite starts {run_dir} over and deletes its checkpoints, but checkpoint.resume={resume} "
            f"resumes from {chosen}: drop one of the two"
        )
    restart = resume == "latest" and chosen is None and (run_dir / "config.yaml").is_file()
    if entries and not (inside or restart or overwrite):
        raise UserError(
            f"output_dir {run_dir} is not empty ({_listing(entries)}): continue its run with "
            "checkpoint.resume=latest, start over with --overwrite (deletes its run artifacts), or choose "
            "another output_dir"
        )
    clear = bool(entries) and overwrite
    if clear:
        foreign = [name for name in entries if name not in RUN_ARTIFACTS]
        if foreign:
            raise UserError(
                f"--overwrite deletes only what a run writes, but output_dir {run_dir} also holds "
                f"{_listing(foreign)}: move them away or choose another output_dir"
            )
    if chosen is not None:
        if checkpointing.is_legacy(chosen):
            warn(
                f"checkpoint {chosen} predates checkpoint manifests: it is used because every file in it "
                "loads, but its config cannot be compared with this one"
            )
            return RunStart("resume", chosen, clear)
        return RunStart("resume", chosen, clear, _accepted(chosen / "config.yaml", config, str(chosen)))
    if restart and not clear:
        return RunStart("restart", changes=_accepted(run_dir / "config.yaml", config, str(run_dir)))
    return RunStart("start", clear=clear)


def write_start(run_dir: Path, start: RunStart, config_yaml: str, custom_components: list[dict]) -> None:
    """Prepare the folder for the run: clear it (overwrite), then the config, its history and custom code."""
    if start.clear:
        for name in RUN_ARTIFACTS:
            path = run_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_yaml)
    record = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "event": start.event,
        "resumed_from": str(start.resume_from) if start.resume_from else None,
        "changes": {key: list(pair) for key, pair in start.changes.items()},
    }
    with (run_dir / HISTORY).open("a") as f:
        f.write(json.dumps(record, default=str) + "\n")
    if custom_components:
        (run_dir / CUSTOM).write_text(json.dumps(custom_components, indent=1))
        for c in custom_components:
            print(f"diffusion-align: the config runs {c['key']}={c['ref']} from {c['file']}", file=sys.stderr)


@dataclasses.dataclass
class RunFolder:
    """The run folder as the trainer sees it: how the run starts, and the config to save there already
    written as YAML text, so the training loop writes the config without handling (or importing) config
    objects. Built by the builder once the config is valid."""

    path: Path
    start: RunStart
    config_yaml: str  # what `save_config` writes for this run's config
    custom_components: list[dict]

    def write_start(self) -> None:
        """Prepare the folder for the run (main process only; see `write_start`)."""
        write_start(self.path, self.start, self.config_yaml, self.custom_components)

    def save_config(self, path: Path) -> None:
        """The run's config as `path` (each checkpoint keeps the config a resume is compared with)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.config_yaml)


def _accepted(saved: Path, config, source: str) -> dict:
    try:
        data = yaml.safe_load(saved.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"cannot resume {source}: its config {saved} does not read ({e})") from e
    accepted = config_changes.check_resume(data or {}, config, source)
    evaluation = [k for k in accepted if k.startswith(("prompts.eval", "eval_rewards"))]
    if evaluation:
        warn(
            f"evaluation settings changed ({', '.join(evaluation[:3])}): the run's 'before' evaluation was "
            "measured with the old ones, so before/after compare different sets"
        )
    return accepted


def _listing(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def on_main(accelerator, decide):
    """`decide()` on the main process only; every process gets its result (or raises its UserError)."""
    if accelerator.num_processes == 1:
        return decide()
    from accelerate.utils import broadcast_object_list

    box: list = [None]
    if accelerator.is_main_process:
        try:
            box = [("ok", decide())]
        except UserError as e:
            box = [("error", str(e))]
    kind, value = broadcast_object_list(box, from_process=0)[0]
    if kind == "error":
        raise UserError(value)
    return value
