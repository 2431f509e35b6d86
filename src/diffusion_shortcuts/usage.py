"""Bad input: the command line's error (one line naming it, exit status 2), and the whole-number check the library's
functions share."""


class UsageError(ValueError):
    """Bad input from the command line: reported as one line, exit status 2."""


def whole_number(name: str, value, low: int = 1, means: str = "", error: type[Exception] = ValueError) -> int:
    """``value`` if it is an int (not a bool) of at least ``low``; else ``error`` naming ``name``, the bound and what
    the bound's value ``means`` (``"0: the sampler's steps"``)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        meaning = f" ({means})" if means else ""
        raise error(f"{name} must be a whole number >= {low}{meaning}, got {value!r}")
    return value
