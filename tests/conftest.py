import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a hub
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture
def sd():
    from diffusion_align.testing import tiny_sd

    return tiny_sd()


@pytest.fixture
def sdxl():
    from diffusion_align.testing import tiny_sdxl

    return tiny_sdxl()
