"""The one error type users see: the CLI prints a `RaydiffError` as one line and exits 2; any
other exception is a bug and keeps its traceback."""


class RaydiffError(ValueError):
    """A problem the user can fix (a config key, a file, an address); one line naming it."""
