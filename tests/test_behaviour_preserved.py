"""Behaviour preserved (issue 13): fixed-seed outputs of the public entry points, recorded on the engine
before the v2 redesign, must come out the same after it.

What is recorded (tests/golden/engine_v1.safetensors; scenarios in tests/golden/scenarios.py):
- sample_and_score: `diffusion-align sample` on the bundled shapes model (2 prompts x 2 seeds, 4 steps,
  batches of 3) as PNG pixels, then `diffusion-align score` on those PNGs (shapes_color_soft +
  0.5 x jpeg_compressibility): every row's component and total.
- train_<ddpo|d3po|prdp|draft|draft_lv|alignprop>: one epoch through `train` on tiny-sd (4 samples,
  2 steps, eta 1, 2 micro-batches of 2, eval before/after): the final LoRA weights, every numeric value of
  metrics.jsonl and the summary's numbers (wall-clock keys excluded).
- reno: 4 ReNO iterations on shapes: best image, best noise, image strip, best iteration, reward history.
- best_of_n (jpeg_incompressibility, 5 seeds, batches of 2) and fk_steering (4 particles, 4 steps, CFG 3):
  the pick (best seed, reward, image), every candidate's reward and the reward-call count.

The scenarios run in one child process with a pinned numeric environment (1 thread; AVX2 kernels in ATen,
MKL and oneDNN; see tests/golden/record.py for why and for the differences measured without it), so the
host's thread count and CPU generation do not enter the outputs.

Tolerance policy: integer tensors (seeds, indices, counts, iterations) must be equal. Float tensors are
compared with torch.testing.assert_close(rtol=1e-6, atol=1e-6); on the recording machine they come out
bit-identical run to run and whatever OMP_NUM_THREADS the test is started with; the margin is for a CI CPU
whose kernel blocking may still differ. PNG pixels (uint8) may differ by at most 1 level: a float change of
1e-6 can move a value across a rounding boundary. A redesign that must reorder float operations keeps these
tolerances and says why in its commit; anything larger is a behaviour change.

Regenerate ONLY for an intended behaviour change, stated with its reason in the commit that updates
the record:
    PYTHONPATH=$PWD python -m tests.golden.record [scenario ...]
"""

import pytest
import torch
from golden.record import RECORD, compute  # tests/golden (pytest puts tests/ on sys.path)
from golden.scenarios import SCENARIOS
from safetensors.torch import load_file

TOLERANCE = dict(rtol=1e-6, atol=1e-6)


@pytest.fixture(scope="module")
def record() -> dict[str, torch.Tensor]:
    return load_file(RECORD)


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict[str, torch.Tensor]:
    """Every scenario, computed once in the pinned child process."""
    out = tmp_path_factory.mktemp("behaviour") / "now.safetensors"
    compute(out, [])
    return load_file(out)


def test_record_covers_every_scenario(record):
    assert {key.split("/", 1)[0] for key in record} == set(SCENARIOS)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_outputs_match_the_record(name, record, outputs):
    expected = {k.split("/", 1)[1]: v for k, v in record.items() if k.startswith(f"{name}/")}
    actual = {k.split("/", 1)[1]: v for k, v in outputs.items() if k.startswith(f"{name}/")}
    assert sorted(actual) == sorted(expected), f"{name}: recorded outputs differ in their names"
    for key, want in expected.items():
        got = actual[key]
        message = f"{name}/{key} differs from the record (tests/test_behaviour_preserved.py: policy)"
        if want.dtype == torch.uint8:  # PNG pixels: rounding to 8 bits only
            torch.testing.assert_close(got.int(), want.int(), rtol=0, atol=1, msg=message)
        elif want.is_floating_point():
            torch.testing.assert_close(got, want, **TOLERANCE, equal_nan=True, msg=message)
        else:
            assert got.dtype == want.dtype and torch.equal(got, want), message
