"""Errors meant for the person at the keyboard: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """Bad input (config, path, prompt list). The message says what was wrong and what to do."""
