"""Errors a user can cause. The CLI prints these as one line, without a traceback."""


class WsiMilError(Exception):
    """Base class for errors that are reported to the user as a single line."""


class ConfigError(WsiMilError):
    pass


class SlideError(WsiMilError):
    """A slide cannot be opened or lacks what a stage needs (e.g. its mpp)."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception, prefixed by its type unless it is one of ours."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, WsiMilError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
