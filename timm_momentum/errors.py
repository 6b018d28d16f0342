"""The errors that bad input raises. Each names the problem; the command line prints it and exits with status 2."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the problem."""


class ConversionError(ValueError):
    """A source that cannot be converted; the message names the problem."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message, or its type's name when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
