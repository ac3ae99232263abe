"""User-facing errors of the rewards package: one line that says what went wrong and what to do."""

from __future__ import annotations

import os

HUB_HELP = (
    "weights are read from the Hugging Face cache (HF_HOME, currently {home}); with HF_HUB_OFFLINE=1 or no "
    "network they must already be there. Otherwise download them elsewhere and pass a local path "
    "({arg}=/path, or --reward-arg {name}.{arg}=/path)"
)


class RewardError(Exception):
    """A reward could not be built or called; the message is one line meant for the user."""


def hub_help(name: str, arg: str = "pretrained") -> str:
    """The standard hint on where weights come from and how to pass a local path instead."""
    home = os.environ.get("HF_HOME", "~/.cache/huggingface")
    return HUB_HELP.format(home=home, name=name, arg=arg)


def load_error(
    name: str, what: str, where: str, err: BaseException | None = None, arg: str = "pretrained"
) -> RewardError:
    """RewardError for a checkpoint that could not be found or read: says where we looked and what to do."""
    reason = ""
    if err is not None:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        reason = f" ({type(err).__name__}: {first[:200]})"
    return RewardError(f"{name}: could not load {what} from {where!r}{reason}; " + hub_help(name, arg))
