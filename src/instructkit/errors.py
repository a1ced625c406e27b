"""Errors a user can fix. The CLI prints them without a traceback and exits with code 2."""


class UserError(Exception):
    """Bad input: a config, a data file, a model path. The message says what and how to fix it."""


class ConfigError(UserError):
    """A config key or value that does not fit the schema."""


class DataError(UserError):
    """A data file that cannot be read or yields no usable examples."""


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row; the message carries a diagnosis."""


def snippet(text, n: int = 200) -> str:
    """Some user text (a prompt, a server's reply) quoted on one line of a message: whitespace
    collapsed, cut at ``n`` characters."""
    text = " ".join(str(text).split())
    return repr(text[:n] + ("..." if len(text) > n else ""))
