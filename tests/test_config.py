"""Strict YAML -> dataclass configs: coercion, one-line errors, overrides, variants, `base:` and round trips.

This module uses `from __future__ import annotations`, so every dataclass here has string annotations;
`test_real_type_annotations` covers the plain (non-string) case with `make_dataclass`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import pytest
import yaml

from diffusion_align.config.loading import from_dict, load_config, save_config, to_dict
from diffusion_align.config.yaml_files import apply_overrides
from diffusion_align.errors import ConfigError, UserError


@dataclass
class Train:
    lr: float = 1e-3
    steps: int = 10
    use_ema: bool = False
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    betas: tuple[float, ...] = (0.9, 0.999)
    out_dir: Path = Path("runs")


@dataclass
class Strategy:
    """Variant base: `name` picks one of VARIANTS."""

    VARIANTS: ClassVar[dict[str, Any]] = {}


@dataclass
class DDPO(Strategy):
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0


@dataclass
class Draft(Strategy):
    k: int = 1


# a lazy "module:attr" reference resolves on first use
Strategy.VARIANTS.update(ddpo=DDPO, draft=f"{__name__}:Draft")


@dataclass
class RewardSpec:
    VARIANTS: ClassVar[dict[str, Any]] = {}
    weight: float = 1.0


@dataclass
class Aesthetic(RewardSpec):
    pass


@dataclass
class Clip(RewardSpec):
    name: str = "clip"  # declares its own `name`, so it receives it
    model: str = "ViT-B-32"


RewardSpec.VARIANTS.update(aesthetic=Aesthetic, clip=Clip)


@dataclass
class Model:
    path: str  # required
    revision: str | None = None


@dataclass
class Root:
    model: Model
    train: Train = field(default_factory=Train)
    strategy: Strategy = field(default_factory=DDPO)
    rewards: list[RewardSpec] = field(default_factory=list)
    prompts: dict[str, list[str]] = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    anything: Any = None
    seed: int | None = None


def one_line_error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message and message.strip() == message
    assert isinstance(info.value, UserError)
    return message


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_round_trip_through_yaml(tmp_path):
    cfg = Root(
        model=Model(path="tiny", revision="main"),
        train=Train(lr=3e-4, steps=7, use_ema=True, precision="bf16", betas=(0.5, 0.75), out_dir=Path("x/y")),
        strategy=Draft(k=3),
        rewards=[Aesthetic(weight=0.5), Clip(model="ViT-L-14", weight=2.0)],
        prompts={"animals": ["cat", "dog"]},
        extra={"free": [1, {"form": True}]},
        anything=[1, "two"],
        seed=4,
    )
    plain = to_dict(cfg)
    assert plain["strategy"] == {"name": "draft", "k": 3}
    assert plain["rewards"][0] == {"name": "aesthetic", "weight": 0.5}
    assert plain["rewards"][1]["name"] == "clip"
    assert plain["train"]["betas"] == [0.5, 0.75] and plain["train"]["out_dir"] == "x/y"
    yaml.safe_dump(plain)  # only plain values

    path = save_config(cfg, tmp_path / "sub" / "resolved.yaml")
    back = load_config(path, cls=Root)
    assert back == cfg
    assert type(back.strategy) is Draft and isinstance(back.train.betas, tuple)
    assert isinstance(back.train.out_dir, Path)

    cfg.train.lr = 1e-9  # a change must show up, so the equality above is not vacuous
    assert load_config(path, cls=Root) != cfg


def test_yaml_scientific_notation_string_becomes_float():
    assert yaml.safe_load("lr: 3e-4")["lr"] == "3e-4"  # the PyYAML behaviour this guards against
    cfg = from_dict(Train, yaml.safe_load("lr: 3e-4\nsteps: 1e3"))
    assert cfg.lr == pytest.approx(3e-4) and type(cfg.lr) is float
    assert cfg.steps == 1000 and type(cfg.steps) is int
    assert from_dict(Train, {"lr": 2}).lr == 2.0 and type(from_dict(Train, {"lr": 2}).lr) is float
    assert "train.steps: expected int, got 2.5" in one_line_error(from_dict, Train, {"steps": 2.5}, "train")


def test_unknown_nested_key_names_dotted_path_and_close_match():
    message = one_line_error(
        from_dict, Root, {"model": {"path": "m"}, "strategy": {"name": "ddpo", "clip_rnage": 0.1}}
    )
    assert "strategy.clip_rnage" in message and "clip_range" in message
    message = one_line_error(from_dict, Root, {"model": {"path": "m"}, "train": {"zzz": 1}})
    assert "train.zzz" in message
    for key in ("lr", "steps", "use_ema", "precision"):  # nothing close: list the valid keys
        assert key in message


def test_wrong_type_message():
    message = one_line_error(from_dict, Root, {"model": {"path": "m"}, "train": {"lr": "fast"}})
    assert message == "train.lr: expected float, got 'fast'"
    message = one_line_error(from_dict, Root, {"model": {"path": "m"}, "seed": "abc"})
    assert message.startswith("seed: expected int") and "'abc'" in message
    message = one_line_error(from_dict, Root, {"model": {"path": "m"}, "prompts": {"a": ["x", [1]]}})
    assert message.startswith("prompts.a.1: expected str")
    assert "expected float, got True" in one_line_error(
        from_dict, Train, {"lr": True}
    )  # bool is not a number


def test_literal_error_lists_allowed_values():
    message = one_line_error(from_dict, Train, {"precision": "bf61"}, "train")
    assert message.startswith("train.precision:")
    for allowed in ("'fp32'", "'bf16'", "'fp16'"):
        assert allowed in message
    assert "'bf61'" in message
    assert from_dict(Train, {"precision": "fp16"}).precision == "fp16"


def test_missing_required_field():
    message = one_line_error(from_dict, Root, {"train": {}})
    assert "'model'" in message and "missing" in message
    message = one_line_error(from_dict, Root, {"model": {"revision": "x"}})
    assert "'model.path'" in message


@pytest.mark.parametrize(
    "text, expected",
    [
        ("true", True),
        ("false", False),
        ("yes", True),
        ("no", False),
        ("1", True),
        ("0", False),
        ("'True'", True),
    ],
)
def test_bool_override_parsing(text, expected):
    data = apply_overrides({"use_ema": not expected}, [f"use_ema={text}"])
    assert from_dict(Train, data).use_ema is expected


def test_bool_rejects_other_strings():
    message = one_line_error(from_dict, Train, apply_overrides({}, ["use_ema=maybe"]), "train")
    assert message == "train.use_ema: expected bool, got 'maybe'"


def test_overrides_nested_lists_and_yaml_values():
    data = {"train": {"lr": 0.1}, "rewards": [{"name": "aesthetic"}, {"name": "clip", "weight": 1}]}
    out = apply_overrides(
        data,
        [
            "train.lr=3e-4",
            "train.betas=[0.1, 0.2]",
            "rewards.1.weight=2",
            "rewards.2.name=aesthetic",  # index == length appends
            "model.path=tiny",  # creates intermediate dicts
            "strategy={name: draft, k: 2}",
        ],
    )
    assert data["train"]["lr"] == 0.1 and len(data["rewards"]) == 2  # input untouched
    cfg = from_dict(Root, out)
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.betas == (0.1, 0.2)
    assert cfg.rewards[1] == Clip(weight=2.0) and isinstance(cfg.rewards[2], Aesthetic)
    assert cfg.model.path == "tiny" and cfg.strategy == Draft(k=2)

    assert "key.sub=value" in one_line_error(apply_overrides, {}, ["train.lr"])
    assert "key.sub=value" in one_line_error(apply_overrides, {}, ["train..lr=1"])
    assert "rewards" in one_line_error(apply_overrides, data, ["rewards.5.weight=1"])
    assert "rewards" in one_line_error(apply_overrides, data, ["rewards.x.weight=1"])
    assert "not valid YAML" in one_line_error(apply_overrides, {}, ["steps=[1, 2"])


def test_tagged_variant_selection_and_unknown_variant():
    base = {"model": {"path": "m"}}
    cfg = from_dict(Root, {**base, "strategy": {"name": "ddpo", "clip_range": "2e-4"}})
    assert type(cfg.strategy) is DDPO and cfg.strategy.clip_range == pytest.approx(2e-4)
    assert type(from_dict(Root, {**base, "strategy": {"name": "draft", "k": 4}}).strategy) is Draft
    assert from_dict(Root, {**base, "strategy": "draft"}).strategy == Draft()  # bare name
    # `name` reaches only the variants that declare it
    rewards = from_dict(
        Root, {**base, "rewards": [{"name": "clip"}, {"name": "aesthetic", "weight": 3}]}
    ).rewards
    assert rewards == [Clip(name="clip"), Aesthetic(weight=3.0)]
    # a dotted module:attr plugs in an unregistered dataclass
    plugged = from_dict(Root, {**base, "strategy": {"name": f"{__name__}:Plugin", "beta": 2}}).strategy
    assert plugged == Plugin(beta=2.0)
    assert to_dict(Root(model=Model("m"), strategy=plugged))["strategy"]["name"] == f"{__name__}:Plugin"

    message = one_line_error(from_dict, Root, {**base, "strategy": {"name": "ddpoo"}})
    assert message.startswith("strategy.name:") and "'ddpoo'" in message
    assert "'ddpo'" in message and "ddpo, draft" in message
    message = one_line_error(from_dict, Root, {**base, "rewards": [{"name": "zzz"}]})
    assert "rewards.0.name" in message and "aesthetic, clip" in message
    # keys of another variant are unknown here
    assert "strategy.k" in one_line_error(from_dict, Root, {**base, "strategy": {"name": "ddpo", "k": 1}})
    assert "strategy.name" in one_line_error(from_dict, Root, {**base, "strategy": {"k": 1}})
    assert "no_such_module" in one_line_error(
        from_dict, Root, {**base, "strategy": {"name": "no_such_module:X"}}
    )


@dataclass
class Plugin:
    beta: float = 1.0


def test_missing_file(tmp_path):
    message = one_line_error(load_config, tmp_path / "nope.yaml", cls=Root)
    assert "not found" in message and str(tmp_path / "nope.yaml") in message


def test_yaml_syntax_error_shows_file_and_line(tmp_path):
    path = write(tmp_path / "bad.yaml", "model:\n  path: m\ntrain:\n  lr: [1, 2\n  steps: 3\nseed: 1\n")
    message = one_line_error(load_config, path, cls=Root)
    assert str(path) in message and "invalid YAML" in message
    assert f"{path}:5:8:" in message  # the unclosed `[1, 2` is reported where the parser gives up

    path = write(tmp_path / "tab.yaml", "model:\n  path: m\n\tseed: 1\n")
    assert f"{path}:3:" in one_line_error(load_config, path, cls=Root)
    assert "mapping" in one_line_error(load_config, write(tmp_path / "list.yaml", "- 1\n"), cls=Root)


def test_base_inheritance(tmp_path):
    (tmp_path / "recipes").mkdir()
    write(
        tmp_path / "recipes" / "real.yaml",
        "model: {path: big-model, revision: v1}\n"
        "train: {lr: 1e-4, steps: 1000, use_ema: true}\n"
        "strategy: {name: ddpo, clip_range: 2e-4}\n"
        "rewards: [{name: aesthetic}, {name: clip}]\n",
    )
    (tmp_path / "cpu").mkdir()
    write(tmp_path / "cpu" / "mid.yaml", "base: ../recipes/real.yaml\ntrain: {steps: 3}\n")
    child = write(
        tmp_path / "cpu" / "tiny.yaml",
        "base: mid.yaml\nmodel: {path: tiny}\nrewards: [{name: aesthetic, weight: 2}]\n",
    )
    cfg = load_config(child, overrides=["train.lr=5e-3"], cls=Root)
    assert cfg.model == Model(path="tiny", revision="v1")  # mappings merge key by key
    assert cfg.train.steps == 3 and cfg.train.use_ema is True and cfg.train.lr == pytest.approx(5e-3)
    assert cfg.rewards == [Aesthetic(weight=2.0)]  # lists replace
    assert cfg.strategy == DDPO(clip_range=2e-4)

    # switching the variant replaces the inherited mapping instead of mixing two variants' keys
    switch = write(tmp_path / "cpu" / "switch.yaml", "base: mid.yaml\nstrategy: {name: draft, k: 2}\n")
    assert load_config(switch, cls=Root).strategy == Draft(k=2)

    missing = write(tmp_path / "cpu" / "missing.yaml", "base: gone.yaml\n")
    message = one_line_error(load_config, missing, cls=Root)
    assert str(tmp_path / "cpu" / "gone.yaml") in message and "missing.yaml" in message
    write(tmp_path / "loop_a.yaml", "base: loop_b.yaml\n")
    write(tmp_path / "loop_b.yaml", "base: loop_a.yaml\n")
    assert "loop" in one_line_error(load_config, tmp_path / "loop_a.yaml", cls=Root)


def test_load_from_dict_with_overrides():
    cfg = load_config({"model": {"path": "m"}}, ["train.steps=5", "seed=null"], cls=Root)
    assert cfg.train.steps == 5 and cfg.seed is None and cfg.model.path == "m"


def test_string_annotations_resolve():
    # this module's annotations are strings; they must resolve to the real types
    assert isinstance(Root.__dataclass_fields__["train"].type, str)
    cfg = from_dict(Root, {"model": {"path": "m"}, "train": {"steps": "4"}, "seed": "7"})
    assert cfg.train.steps == 4 and cfg.seed == 7


def test_real_type_annotations():
    Inner = dataclasses.make_dataclass(
        "Inner", [("rate", float, 0.5), ("tags", list[str], field(default_factory=list))]
    )
    Outer = dataclasses.make_dataclass("Outer", [("inner", Inner), ("mode", Literal["a", "b"], "a")])
    cfg = from_dict(Outer, {"inner": {"rate": "1e-2", "tags": ["x"]}, "mode": "b"})
    assert cfg.inner.rate == pytest.approx(1e-2) and cfg.inner.tags == ["x"] and cfg.mode == "b"
    assert "inner.rte" in one_line_error(from_dict, Outer, {"inner": {"rte": 1}})


@dataclass
class Checked:
    low: float = 0.0
    high: float = 1.0

    def __post_init__(self):
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        if self.high > 100:
            raise ValueError("high is too large\nuse at most 100")


def test_post_init_checks_are_config_errors():
    assert from_dict(Checked, {"low": 0.5}).low == 0.5
    message = one_line_error(from_dict, Checked, {"low": 2}, "range")
    assert message == "range: low (2.0) must not exceed high (1.0)"
    assert one_line_error(from_dict, Checked, {"high": 200}) == "Checked: high is too large use at most 100"
