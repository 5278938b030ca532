"""One exception type for every expected failure, so the CLI can print one line instead of a traceback."""


class HeaprError(Exception):
    """A problem with the user's input or environment, with the fix in the message."""
