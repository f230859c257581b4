"""The one exception type for problems a user can cause (bad files, bad data, bad options), and the
one-line form every error message takes on the way to the user."""


class AnpError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2."""


def one_line(message: BaseException | str) -> str:
    """An exception's message (or any text) with its newlines and runs of spaces folded, so that a CLI
    error, a batch row or a log entry stays one line."""
    return " ".join(str(message).split())
