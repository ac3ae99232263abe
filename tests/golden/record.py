"""Regenerate the behaviour record `tests/golden/engine_v1.safetensors` (see tests/test_behaviour_preserved.py).

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python -m tests.golden.record [scenario ...]

Only for an INTENDED behaviour change, stated with its reason in the commit that updates the record; a
refactor must pass the existing record unchanged. Naming scenarios re-records only those (the others are
kept as they are)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from tests.golden.scenarios import SCENARIOS, run  # noqa: E402

RECORD = Path(__file__).resolve().parent / "engine_v1.safetensors"


def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        sys.exit(f"unknown scenario(s) {unknown}; choose from {sorted(SCENARIOS)}")
    torch.set_num_threads(1)
    record = load_file(RECORD) if names and RECORD.is_file() else {}
    for name in names or SCENARIOS:
        record = {k: v for k, v in record.items() if not k.startswith(f"{name}/")}
        record |= {f"{name}/{k}": v for k, v in run(name).items()}
        print(f"recorded {name}", flush=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    save_file(record, RECORD, metadata={"torch": torch.__version__, "recorded_at_commit": commit})
    print(f"wrote {len(record)} tensors to {RECORD} ({RECORD.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main(sys.argv[1:])
