"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """A problem with input the user gave (files, flags, data, checkpoints). Exit code 1."""

    exit_code = 1


class ConfigError(UserError):
    """A bad config file or flag. Exit code 2, like argparse."""

    exit_code = 2


class SettingError(ConfigError):
    """One setting's value is of the wrong type or out of range: `key` and what is wrong with it, kept
    apart so that a command-line flag can be named instead of its key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key} {problem}")
        self.key, self.problem = key, problem


def error_line(error: UserError) -> tuple[str, int]:
    """What a refused command prints, and its exit code."""
    return f"error: {error}", error.exit_code
