"""Errors meant for the person at the keyboard: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input (config, path, prompt list). The message says what was wrong and what to do."""


class ConfigError(UserError):
    """A config problem (a bad key or value); the message is always a single line."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).splitlines()))


def warn(message: str) -> None:
    """A one-line warning on stderr (the run goes on)."""
    import sys

    print(f"diffusion-align: warning: {message}", file=sys.stderr)
