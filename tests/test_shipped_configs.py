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


# Ship only what runs: each accelerate file is launched (two CPU processes) by this test.
LAUNCHED_BY = {
    "ddp.yaml": ("test_train_cli.py", "test_accelerate_two_processes_match_one_process"),
    "fsdp.yaml": ("test_fsdp.py", "ddpo"),  # the module fixture of the sharded DDPO tests
}


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_config_is_valid(path):
    data = yaml.safe_load(path.read_text())
    assert data["distributed_type"] in {"MULTI_GPU", "FSDP"}
    assert isinstance(data["num_processes"], int)
    assert "NOT YET" not in path.read_text()


def test_accelerate_configs_are_ddp_and_fsdp_each_launched_by_a_test():
    import ast

    kinds = {yaml.safe_load(p.read_text())["distributed_type"] for p in ACCELERATE}
    assert kinds == {"MULTI_GPU", "FSDP"}  # DeepSpeed left: README, "Multi-GPU and multi-node"
    assert {p.name for p in ACCELERATE} == set(LAUNCHED_BY)
    for name, (module, function) in LAUNCHED_BY.items():
        tree = ast.parse((Path(__file__).parent / module).read_text())
        body = next(n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef) and n.name == function)
        strings = {n.value for n in ast.walk(body) if isinstance(n, ast.Constant)}
        assert name in strings and "accelerate.commands.launch" in strings, f"{module}::{function}"
