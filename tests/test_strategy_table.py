"""The STRATEGIES table: one entry per strategy name gives its config class and its strategy class; a config
given as `package.module:ConfigClass` outside the table finds its class by the documented naming rule."""

import importlib
from dataclasses import dataclass

import pytest

from diffusion_align.config import load_config
from diffusion_align.errors import UserError
from diffusion_align.methods.strategies import STRATEGIES, STRATEGY_CONFIGS, strategy_class


def imported(ref: str):
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@dataclass
class PlainSettings:  # named unlike its strategy class: only a table entry can connect the two
    scale: float = 1.0


class ScaledToy:
    pass


@dataclass
class OrphanConfig:  # not in the table and no `Orphan` class next to it
    pass


@pytest.fixture
def plain_entry():
    STRATEGIES["plain"] = (f"{__name__}:PlainSettings", f"{__name__}:ScaledToy")
    yield
    STRATEGIES.pop("plain")


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_name_reads_its_config_and_finds_its_class(name):
    config_ref, class_ref = STRATEGIES[name]
    config = load_config({"strategy": name}).strategy
    assert type(config) is imported(config_ref)
    assert strategy_class(config) is imported(class_ref)
    assert STRATEGY_CONFIGS[name] == config_ref


def test_the_table_not_the_class_name_decides(plain_entry):
    config = load_config({"strategy": {"name": "plain", "scale": 2.0}}).strategy
    assert type(config) is PlainSettings and config.scale == 2.0
    assert strategy_class(config) is ScaledToy
    assert "plain" in STRATEGY_CONFIGS and STRATEGY_CONFIGS["plain"] == f"{__name__}:PlainSettings"


def test_a_custom_module_attr_config_finds_the_class_next_to_it():
    from test_trainer import Toy, ToyConfig

    config = load_config({"strategy": f"{ToyConfig.__module__}:ToyConfig"}).strategy
    assert type(config) is ToyConfig and strategy_class(config) is Toy


def test_a_custom_config_without_its_class_is_a_one_line_error():
    with pytest.raises(UserError) as info:
        strategy_class(OrphanConfig())
    assert "\n" not in str(info.value) and "no strategy class Orphan" in str(info.value)
