"""Prompt sources: built-in lists, .txt and .jsonl files, and one-line errors for bad input."""

import random
from pathlib import Path

import pytest

from diffusion_align.errors import UserError
from diffusion_align.prompts import BUILTIN, load_prompt_records, load_prompts
from rewards.shapes import parse_caption


def test_builtin_lists():
    train, heldout = load_prompts("shapes_train"), load_prompts("shapes_heldout")
    assert len(train) > 100 and len(heldout) == 48
    assert not set(train) & set(heldout)  # held-out combinations never appear in training
    for caption in train[:5] + heldout[:5]:
        parse_caption(caption)  # the shapes rewards can read every caption
    animals = load_prompts("simple_animals")
    assert len(animals) == len(set(animals)) == 45
    assert set(BUILTIN) >= {"shapes_train", "shapes_heldout", "simple_animals"}


def test_shipped_green_on_black_split_follows_its_stated_rule():
    """configs/cpu/shapes_green_on_black_*.txt: the CPU likelihood recipes train on one and are judged on the
    other, so the split must be what the files' header says, with no prompt on both sides."""
    cpu = Path(__file__).resolve().parents[1] / "configs" / "cpu"
    train = load_prompts(cpu / "shapes_green_on_black_train.txt")
    heldout = load_prompts(cpu / "shapes_green_on_black_heldout.txt")
    family = [p for p in load_prompts("shapes_train") if "green" in p and "black background" in p]
    random.Random(0).shuffle(family)
    quarter = len(family) // 4
    assert sorted(heldout) == sorted(family[:quarter]) and sorted(train) == sorted(family[quarter:])
    assert not set(train) & set(heldout)


def test_txt_file_skips_blank_lines_and_comments(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# my prompts\na cat\n\n  a dog on a sofa  \n")
    assert load_prompts(path) == ["a cat", "a dog on a sofa"]


def test_jsonl_keeps_metadata(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a cat", "tag": "animal"}\n\n{"prompt": "a red car", "id": 7}\n')
    assert load_prompt_records(path) == [
        {"prompt": "a cat", "tag": "animal"},
        {"prompt": "a red car", "id": 7},
    ]
    assert load_prompts(path) == ["a cat", "a red car"]


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("empty.txt", "\n# only a comment\n", "has no prompts"),
        ("bad.jsonl", '{"prompt": "ok"}\nnot json\n', r"bad.jsonl:2: not valid JSON"),
        ("nokey.jsonl", '{"text": "a cat"}\n', 'expected an object with a "prompt" string'),
        ("p.csv", "a cat\n", "unknown extension"),
    ],
)
def test_bad_files_give_one_line_errors(tmp_path, name, text, match):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(UserError, match=match) as info:
        load_prompts(path)
    assert "\n" not in str(info.value)


def test_unknown_source_names_builtins_and_path(tmp_path):
    with pytest.raises(UserError, match="neither a built-in list") as info:
        load_prompts(tmp_path / "missing.txt")
    assert "shapes_train" in str(info.value) and "missing.txt" in str(info.value)


def test_missing_bundled_list_says_how_to_rebuild(tmp_path, monkeypatch):
    from diffusion_align import bundled

    monkeypatch.setitem(bundled.PROMPT_LISTS, "shapes_heldout", tmp_path / "gone.txt")
    with pytest.raises(UserError, match="zoo build shapes"):
        load_prompts("shapes_heldout")


def test_a_missing_prompt_file_is_reported_before_the_model_loads(tmp_path):
    """The model here does not exist either: the prompt error first means no checkpoint was waited for."""
    from diffusion_align.builder import build_run
    from diffusion_align.config import load_config

    config = load_config(
        {"model": {"device": "cpu"}},
        [
            f"model.pretrained={tmp_path / 'no_model'}",
            "strategy=ddpo",
            f"prompts.train={tmp_path / 'missing.txt'}",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    with pytest.raises(UserError, match="missing.txt"):
        build_run(config)
