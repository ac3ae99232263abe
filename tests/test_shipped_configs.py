"""Every shipped YAML loads and validates: recipes through our strict config, accelerate files as YAML."""

from pathlib import Path

import pytest
import yaml

from diffusion_align.config import load_config
from diffusion_align.config.settings import Config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.parts)
ACCELERATE = sorted((CONFIGS / "accelerate").glob("*.yaml"))


def test_there_are_recipes_for_every_strategy():
    from diffusion_align.methods.strategies import STRATEGY_CONFIGS

    covered = {load_config(p).strategy.__class__.__name__ for p in RECIPES if load_config(p).strategy}
    for name, ref in STRATEGY_CONFIGS.items():
        assert ref.split(":")[1] in covered, f"no shipped recipe uses strategy {name}"


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_recipe_loads_and_validates(path):
    config = load_config(path)
    assert isinstance(config, Config)
    assert config.strategy is not None or path.name.startswith("sample"), "a training recipe needs a strategy"
    assert config.rewards, "a recipe needs at least one reward"


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_is_valid(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in {"MULTI_GPU", "FSDP", "DEEPSPEED"}
    assert isinstance(data["num_processes"], int)


def test_accelerate_configs_cover_ddp_fsdp_and_deepspeed():
    kinds = {yaml.safe_load(p.read_text())["distributed_type"] for p in ACCELERATE}
    assert kinds == {"MULTI_GPU", "FSDP", "DEEPSPEED"}
