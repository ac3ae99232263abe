"""Compute the behaviour-record scenarios (tests/golden/scenarios.py) in a pinned numeric environment.

    PYTHONPATH=$PWD python -m tests.golden.record [scenario ...]              # regenerate the record
    PYTHONPATH=$PWD python -m tests.golden.record --out FILE [scenario ...]   # compute only (the test)

Regenerating `tests/golden/engine_v1.safetensors` is only for an INTENDED behaviour change, stated with its
reason in the commit that updates it; a refactor must pass the existing record unchanged. Naming scenarios
re-records only those.

Why a pinned environment: float32 kernels differ in summation order between thread counts and between CPU
instruction sets (measured on this code: AVX512 vs AVX2 kernels, or 1 vs 2 threads, move UNet outputs by up
to ~1e-5 relative and one Adam step's LoRA weights by ~1e-6). The scenarios therefore run in a child process
with one thread and AVX2 kernels in ATen, MKL (with conditional numerical reproducibility) and oneDNN, which
every x86-64 CI machine has, so the outputs do not depend on the host's thread count or CPU generation."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

RECORD = Path(__file__).resolve().parent / "engine_v1.safetensors"
ROOT = RECORD.parents[2]
PINNED = {
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's vectorised kernels
    "MKL_ENABLE_INSTRUCTIONS": "AVX2",
    "MKL_CBWR": "AVX2",  # MKL conditional numerical reproducibility
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "HF_HUB_OFFLINE": "1",
    "CUDA_VISIBLE_DEVICES": "",
}


def compute(out: Path, names: list[str]) -> None:
    """Run `names` (all if empty) in a child process with the pinned environment; write them to `out`."""
    env = {
        **os.environ,
        **PINNED,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [sys.executable, "-m", "tests.golden.record", "--child", "--out", str(out), *names]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"scenario run failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}")


def _child(out: Path, names: list[str]) -> None:
    assert all(os.environ.get(k) == v for k, v in PINNED.items()), "run through compute()"
    import torch
    from safetensors.torch import load_file, save_file

    from tests.golden.scenarios import SCENARIOS, run

    torch.set_num_threads(1)
    unknown = sorted(set(names) - set(SCENARIOS))
    if unknown:
        sys.exit(f"unknown scenario(s) {unknown}; choose from {sorted(SCENARIOS)}")
    record = load_file(out) if names and out.is_file() else {}
    for name in names or SCENARIOS:
        record = {k: v for k, v in record.items() if not k.startswith(f"{name}/")}
        record |= {f"{name}/{k}": v for k, v in run(name).items()}
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout
    meta = {
        "torch": torch.__version__,
        "computed_at_commit": commit.strip(),
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }
    save_file(record, out, metadata=meta)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.golden.record", description=__doc__.split("\n")[0])
    parser.add_argument("scenarios", nargs="*", help="scenario names (default: all)")
    parser.add_argument("--out", type=Path, default=RECORD, help="output file (default: the record)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _child(args.out, args.scenarios)
        return
    compute(args.out, args.scenarios)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e3:.0f} kB)")


if __name__ == "__main__":
    main(sys.argv[1:])
