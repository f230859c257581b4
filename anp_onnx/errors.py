"""The one exception type for problems a user can cause (bad files, bad data, bad options)."""


class AnpError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""
