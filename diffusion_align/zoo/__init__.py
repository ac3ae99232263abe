"""Build-only code of the bundled shapes models: the recipe that trains them (shapes_recipe), their model
builders (shapes_models), data generator (shapes_data), eval (shapes_eval) and card (shapes_card).

Only `diffusion-align zoo build|eval` (commands/zoo.py) imports it; the runtime finds the bundled models and
their prompt lists through `diffusion_align.bundled` (tests/test_architecture.py keeps it that way).
"""

from __future__ import annotations

# Where these names lived before the split; kept importable for user code (bundled never imports zoo).
from diffusion_align.bundled import BUNDLED, bundled_path, resolve_reward_args

__all__ = ["BUNDLED", "bundled_path", "resolve_reward_args"]
