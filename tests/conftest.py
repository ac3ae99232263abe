import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
if "OMP_NUM_THREADS" not in os.environ:  # set by whoever shares the machine with other jobs: respected
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def sd():
    from diffusion_align.testing import tiny_sd

    return tiny_sd()


@pytest.fixture
def sdxl():
    from diffusion_align.testing import tiny_sdxl

    return tiny_sdxl()


# A finished 2-epoch DDPO run on tiny-sd (DDPO: a strategy.pt too) with checkpoints 1 and 2, built once for
# the resume and run-folder tests; each test works on its own copy.
RUN_SETTINGS = {"train.epochs": 2, "checkpoint.every": 1, "checkpoint.keep_last": 3, "logging.eval_every": 0}


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Path:
    from test_trainer import tiny_config

    from diffusion_align.builder import train

    run = tmp_path_factory.mktemp("base") / "run"
    train(tiny_config(run, "ddpo", **RUN_SETTINGS))
    return run


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny video and transformer models run many small ops: on a shared 2-core machine two OpenMP threads
    stall waiting for each other (single calls spiking from 0.2 s to 11 s, measured); one thread is steady
    and as fast. Use with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
