"""Errors a user can cause. The CLI prints these as one line, without a traceback."""


class WsiMilError(Exception):
    """Base class for errors that are reported to the user as a single line."""


class ConfigError(WsiMilError):
    pass


class SlideError(WsiMilError):
    """A slide cannot be opened or lacks what a stage needs (e.g. its mpp)."""


class SourceUnavailable(SlideError):
    """The server a slide is read from stopped answering: the slide fails (never blank patches in its
    place, as for one corrupt tile of a local file) and a rerun reads it again."""


def one_line(exc: BaseException) -> str:
    """The first line of an exception, prefixed by its type unless it is one of ours."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, WsiMilError):
        return text or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
