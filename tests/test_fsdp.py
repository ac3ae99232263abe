"""The FSDP2-sharded frozen denoiser (`model.shard: fsdp`, or `accelerate launch` with
configs/accelerate/fsdp.yaml) on two CPU processes over gloo: the LoRA matches a one-process run at the same
global batch, each process holds half of the denoiser's weights, a SIGKILLed sharded run resumes to the
uninterrupted result (on two processes, or on one), and a two-"machine" torchrun launch on one host works."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train_cli import free_port

from diffusion_align.cli import main
from diffusion_align.training import checkpointing

ROOT = Path(__file__).resolve().parents[1]
LORA = "pytorch_lora_weights.safetensors"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TRAIN = ["-m", "diffusion_align", "train"]


def write_config(folder: Path, strategy: dict, reward: str, **train) -> Path:
    config = {
        "model": {"pretrained": "tiny-sd"},
        "strategy": strategy,
        "sample": {"num_steps": 2, "batch_size": 2, "guidance_scale": 1.0},
        "rewards": [{"name": reward}],
        "prompts": {"eval_count": 2},  # evaluation runs the sharded denoiser on every process
        "train": {"epochs": 2, "samples_per_epoch": 4, "batch_size": 4, "micro_batch_size": 2, **train},
        "checkpoint": {"every": 1, "keep_last": 5},
        "logging": {"eval_every": 0, "progress": False, "tensorboard": False},
    }
    path = folder / f"{strategy['name']}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def run(command: list[str], timeout: int = 900) -> None:
    result = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]


def summary_of(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def lora_diff(a: Path, b: Path) -> float:
    x, y = load_file(a / LORA), load_file(b / LORA)
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


def full_denoiser_bytes() -> int:
    """The tiny-sd UNet's weights, counted on a fresh copy (no LoRA, nothing sharded)."""
    from diffusion_align.testing import tiny_sd

    return sum(p.numel() * p.element_size() for p in tiny_sd().unet.parameters())


@pytest.fixture(scope="module")
def ddpo(tmp_path_factory):
    """A 3-epoch DDPO run on one process and the same config launched by `accelerate launch` with the
    shipped configs/accelerate/fsdp.yaml on two CPU processes (only the process count overridden)."""
    folder = tmp_path_factory.mktemp("ddpo")
    path = write_config(folder, {"name": "ddpo"}, "jpeg_compressibility", epochs=3)
    start = time.perf_counter()
    assert main(["train", str(path), f"output_dir={folder / 'one'}"]) == 0
    one_seconds = time.perf_counter() - start
    start = time.perf_counter()
    run(
        [
            sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2",
            "--main_process_port", str(free_port()), *TRAIN, str(path), f"output_dir={folder / 'two'}",
        ]
    )  # fmt: skip
    print(f"DDPO wall: one process {one_seconds:.1f} s, two sharded {time.perf_counter() - start:.1f} s")
    return folder, path


@pytest.mark.slow
def test_ddpo_sharded_by_the_fsdp_launch_config_matches_one_process(ddpo):
    folder, _ = ddpo
    one, two = summary_of(folder / "one"), summary_of(folder / "two")
    assert two["sharded"] and two["world_size"] == 2 and two["lora_max_rank_difference"] == 0.0
    diff = lora_diff(folder / "one" / "lora", folder / "two" / "lora")
    print(f"DDPO one vs two sharded processes: max |dLoRA| = {diff:.3g}")
    assert diff < 1e-5  # float32 summation order of the gradient all-reduce and accumulation
    assert two["eval_after"] == pytest.approx(one["eval_after"], abs=1e-3)
    full = full_denoiser_bytes()
    unsharded, sharded = one["denoiser_bytes_per_process"], two["denoiser_bytes_per_process"]
    print(f"frozen denoiser bytes per process: unsharded {unsharded}, sharded {sharded} (full model {full})")
    assert not one["sharded"] and unsharded == [full]
    for held in sharded:
        assert 0.45 * full <= held <= 0.55 * full


@pytest.mark.slow
def test_sigkilled_sharded_run_resumes_to_the_uninterrupted_one_on_two_processes_or_one(ddpo, tmp_path):
    """torchrun with model.shard=fsdp (the same config file otherwise), killed while it writes checkpoint 2:
    resumed on two processes it ends where the uninterrupted two-process run ended; resumed on one process
    (the same global batch, the per-process share re-derived) where the one-process run ended."""
    folder, path = ddpo
    out = tmp_path / "killed"
    launch = torchrun("--nproc_per_node", "2", "--master_port", str(free_port()))
    proc = subprocess.Popen(
        [*launch, *TRAIN, str(path), f"output_dir={out}", "model.shard=fsdp"],
        env={**ENV, checkpointing.PAUSE_ENV: "2"},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    marker = out / "checkpoints" / ".tmp-checkpoint-000002" / checkpointing.PAUSE_MARKER
    deadline = time.time() + 600
    while not marker.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the run never reached the checkpoint write"
        time.sleep(0.2)
    for process in [*psutil.Process(proc.pid).children(recursive=True), proc]:  # torchrun puts its workers
        os.kill(process.pid, signal.SIGKILL)  # in sessions of their own: each is killed, as by a crash
    proc.wait()
    latest, _ = checkpointing.resolve_resume("latest", out / "checkpoints")
    assert latest.name == "checkpoint-000001"
    on_one = Path(shutil.copytree(out, tmp_path / "on_one"))

    resume = ["checkpoint.resume=latest", "model.shard=fsdp"]
    launch = torchrun("--nproc_per_node", "2", "--master_port", str(free_port()))
    run([*launch, *TRAIN, str(path), f"output_dir={out}", *resume])
    assert summary_of(out)["epochs"] == 3 and summary_of(out)["sharded"]
    diff = lora_diff(folder / "two" / "lora", out / "lora")
    print(f"sharded resume after SIGKILL vs uninterrupted, two processes: max |dLoRA| = {diff:.3g}")
    assert diff <= 1e-6

    assert main(["train", str(path), f"output_dir={on_one}", "checkpoint.resume=latest"]) == 0
    diff = lora_diff(folder / "one" / "lora", on_one / "lora")
    print(f"two-process checkpoint resumed on one process vs one-process run: max |dLoRA| = {diff:.3g}")
    assert diff < 1e-5


@pytest.mark.slow
def test_draft_on_two_machines_simulated_with_torchrun_matches_one_process(tmp_path):
    """Two torchrun invocations (--nnodes 2, one process each, rendezvous on 127.0.0.1) sharing one run
    folder, as two machines sharing a filesystem would: DRaFT-K through the sharded denoiser (gradient
    checkpointing recomputes its blocks in backward) ends where the one-process run ends."""
    path = write_config(tmp_path, {"name": "draft", "k": 1}, "shapes_color_soft")
    start = time.perf_counter()
    assert main(["train", str(path), f"output_dir={tmp_path / 'one'}"]) == 0
    one_seconds = time.perf_counter() - start
    port, out = str(free_port()), tmp_path / "two_machines"
    start = time.perf_counter()
    nodes = [
        subprocess.Popen(
            [
                *torchrun("--nnodes", "2", "--node_rank", str(i), "--nproc_per_node", "1",
                          "--master_addr", "127.0.0.1", "--master_port", port),
                *TRAIN, str(path), f"output_dir={out}", "model.shard=fsdp",
            ],
            env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]  # fmt: skip
    for node in nodes:
        _, err = node.communicate(timeout=900)
        assert node.returncode == 0, err[-3000:]
    seconds = time.perf_counter() - start
    print(f"DRaFT wall: one process {one_seconds:.1f} s, two sharded 'machines' {seconds:.1f} s")
    two = summary_of(out)
    assert two["world_size"] == 2 and two["sharded"] and two["lora_max_rank_difference"] == 0.0
    diff = lora_diff(tmp_path / "one" / "lora", out / "lora")
    print(f"DRaFT one process vs two sharded 'machines': max |dLoRA| = {diff:.3g}")
    assert diff < 1e-5
    trained = load_file(out / "lora" / LORA)
    assert max(v.abs().max().item() for k, v in trained.items() if "lora.up" in k) > 0  # B starts at 0


@pytest.mark.slow
def test_every_family_sharded_per_block_gives_the_full_model_output_gradient_and_half_the_bytes():
    """SD 1.5 and SDXL UNets, SD3, FLUX and Wan transformers (tiny): forward and LoRA gradient through the
    sharded denoiser (adapter on and off) equal those with the full weights in the same process."""
    names = ["tiny-sd", "tiny-sdxl", "tiny-sd3", "tiny-flux", "tiny-wan"]
    launch = torchrun("--nproc_per_node", "2", "--master_port", str(free_port()))
    result = subprocess.run(
        [*launch, "tests/fsdp_families.py", *names], env=ENV, capture_output=True, text=True, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    families = json.loads(result.stdout.strip().splitlines()[-1])
    for name in names:
        r = families[name]
        print(f"{name}: frozen bytes per process {r['bytes'][0]} -> {r['bytes'][1]}, max |d output| "
              f"{r['output']:.3g}, max |d grad| {r['grad']:.3g} (of {r['grad_scale']:.3g})")  # fmt: skip
        assert r["output"] <= 1e-6 and r["grad"] <= 1e-6 * max(1.0, r["grad_scale"]) and r["grad_scale"] > 0
        assert 0.45 * r["bytes"][0] <= r["bytes"][1] <= 0.55 * r["bytes"][0]


# Float rounding (the order of sums differs between the runs compared) is 1e-7..1e-6 in the LoRA, more where
# Adam divides a tiny gradient entry by its tiny scale: NFT, and offline DPO, which learns from one to three
# pairs an epoch here. Some methods amplify it: balancing normalises two near-opposite reward gradients;
# PRDP's second update on a batch clips each step's log-ratio at eps = 1e-6 around the old policy's, the
# scale of float32 rounding of a log-prob, so rounding flips some steps in or out of the clip.
TOLERANCE = {"diffusion_nft": 5e-5, "dpo_offline": 1e-4, "draft_balanced": 5e-5, "prdp_two_updates": 1e-3}


@pytest.mark.slow
def test_every_strategy_trains_sharded_as_replicated_even_when_processes_plan_unequal_micro_batches(tmp_path):
    """D3PO, PRDP, filtered DDPO / Flow-GRPO, on-line and offline Diffusion-DPO, reward SFT, AlignProp with a
    random cut, DiffusionNFT and DRaFT balancing two rewards' gradients, each trained on two processes with
    the denoiser sharded and replicated (tests/fsdp_strategies.py): the same LoRA, and where the processes'
    plans differed (decisive pairs, ties, bad offline rows) the sharded run padded them with weight-0
    filler micro-batches; every process ends with the same LoRA; and two processes end where one process
    does on the same global batch."""
    launch = torchrun("--nproc_per_node", "2", "--master_port", str(free_port()))
    start = time.perf_counter()
    result = subprocess.run(
        [*launch, "tests/fsdp_strategies.py", str(tmp_path)],
        env=ENV,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    cases = json.loads(result.stdout.strip().splitlines()[-1])
    seconds = time.perf_counter() - start
    print(f"{len(cases)} strategies sharded and replicated on two processes: {seconds:.0f} s")
    for name, r in cases.items():
        print(f"{name}: max |dLoRA| {r['diff']:.3g}, fillers {r['fillers']:g}, largest B {r['trained']:.3g}")
        assert r["trained"] > 0 and r["diff"] < TOLERANCE.get(name, 1e-5) and r["rank_spread"] == 0.0, name
    assert len(cases) == 11
    # the padding was exercised where the processes' plans depend on their samples
    assert all(cases[name]["fillers"] > 0 for name in ("d3po", "prdp", "prdp_two_updates", "dpo_offline")), (
        cases
    )

    # and two processes train as one does on the same global batch (one optimizer step per epoch), however
    # unevenly the processes' kept samples fall: each step is the mean over every process's samples.
    # AlignProp's random cut is process 0's draw, from a generator that a one-process run advances otherwise;
    # balancing solves its coefficients per micro-batch, and one process splits the step into other ones.
    # One torch thread, as the two processes ran: another thread count sums in another order, and that
    # rounding alone, amplified by Adam in entries with tiny gradients, reaches 2e-4 here (measured).
    one, threads = {}, torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for name in sorted(set(cases) - {"alignprop_random_cut", "draft_balanced"}):
            folder = tmp_path / name
            assert main(["train", str(folder / "config.yaml"), f"output_dir={folder / 'one'}"]) == 0
            one[name] = lora_diff(folder / "one" / "lora", folder / "none" / "lora")
            print(f"{name}: one process vs two replicated, max |dLoRA| {one[name]:.3g}")
    finally:
        torch.set_num_threads(threads)
    assert all(diff < TOLERANCE.get(name, 1e-5) for name, diff in one.items()), one


@pytest.mark.parametrize(
    "overrides, launched, message",
    [
        (["model.shard=none"], True, "model.shard=none contradicts the FSDP launch"),
        (["model.shard=fsdp", "checkpoint.export_merged=true"], False, "cannot merge the LoRA into"),
        (["strategy=test_trainer:ToyConfig", "model.shard=fsdp"], False, "Toy has no `filler.micro.` method"),
    ],
    ids=["none-under-fsdp-launch", "export-merged", "custom-strategy-without-filler"],
)
def test_settings_a_sharded_run_cannot_follow_are_one_line_errors(
    tmp_path, monkeypatch, overrides, launched, message
):
    from diffusion_align.builder import FSDP_LAUNCH_ENV, sharding_mode
    from diffusion_align.config import load_config
    from diffusion_align.errors import UserError

    if launched:
        monkeypatch.setenv(FSDP_LAUNCH_ENV, "true")
    config = load_config(write_config(tmp_path, {"name": "ddpo"}, "jpeg_compressibility"), overrides)
    with pytest.raises(UserError, match=message) as error:
        sharding_mode(config)
    assert "\n" not in str(error.value)


def test_the_fsdp_launch_shards_and_an_explicit_setting_wins_otherwise(tmp_path, monkeypatch):
    from diffusion_align.builder import FSDP_LAUNCH_ENV, sharding_mode
    from diffusion_align.config import load_config

    path = write_config(tmp_path, {"name": "ddpo"}, "jpeg_compressibility")
    assert sharding_mode(load_config(path)) == "none"
    assert sharding_mode(load_config(path, ["model.shard=fsdp"])) == "fsdp"
    monkeypatch.setenv(FSDP_LAUNCH_ENV, "true")
    assert sharding_mode(load_config(path)) == "fsdp"
