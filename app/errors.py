"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""


class UserError(Exception):
    """A problem with input the user gave (files, flags, data, checkpoints). Exit code 1."""

    exit_code = 1


class ConfigError(UserError):
    """A bad config file or flag. Exit code 2, like argparse."""

    exit_code = 2
