"""Relative paths in a config file are relative to its folder, so shipped recipes run from anywhere."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusion_align.config import load_config
from diffusion_align.prompts import load_prompts

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.parts)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_shipped_recipe_resolves_its_files_from_any_directory(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = load_config(path)
    for source in (config.prompts.train, config.prompts.eval):
        assert load_prompts(source), source
    assert not Path(config.output_dir).is_absolute()  # runs go where the command runs


def test_paths_are_relative_to_the_config_file_outputs_to_the_cwd(tmp_path, monkeypatch):
    recipe = tmp_path / "recipes" / "mine.yaml"
    recipe.parent.mkdir()
    (recipe.parent / "train.txt").write_text("a red circle\n")
    recipe.write_text("prompts: {train: train.txt, eval: shapes_heldout}\noutput_dir: runs/mine\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "cwd.txt").write_text("a blue square\n")
    monkeypatch.chdir(elsewhere)
    config = load_config(recipe, ["prompts.eval=cwd.txt"])
    assert Path(config.prompts.train) == recipe.parent.resolve() / "train.txt"
    assert config.prompts.eval == "cwd.txt"  # command-line values are relative to the cwd
    assert config.output_dir == "runs/mine"
    assert load_config(recipe).prompts.eval == "shapes_heldout"  # a built-in name is kept


def test_base_file_paths_are_relative_to_the_base_file(tmp_path, monkeypatch):
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "prompts.txt").write_text("one\n")
    (tmp_path / "shared" / "base.yaml").write_text("prompts: {train: prompts.txt}\n")
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "run.yaml").write_text("base: ../shared/base.yaml\ntrain: {epochs: 2}\n")
    monkeypatch.chdir(tmp_path / "exp")
    config = load_config(tmp_path / "exp" / "run.yaml")
    assert load_prompts(config.prompts.train) == ["one"]


def test_a_path_only_the_cwd_has_is_kept_as_written(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "c.yaml").write_text("prompts: {train: data/p.txt}\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "p.txt").write_text("x\n")
    monkeypatch.chdir(tmp_path)
    assert load_config(tmp_path / "cfg" / "c.yaml").prompts.train == "data/p.txt"
