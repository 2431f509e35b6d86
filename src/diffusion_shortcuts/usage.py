"""The command line's error for bad input: one line naming it, exit status 2."""


class UsageError(ValueError):
    """Bad input from the command line: reported as one line, exit status 2."""
