"""The one exception type for mistakes a user can fix: shown as one line, never a traceback."""

# Exit status of a worker or command that stopped on a UserError.
USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad flags, config, data or environment: the message says what is wrong and what to do."""

# Exit status of a worker that stopped with a one-line message that is not the user's doing (a
# peer died or a collective timed out): the CLI shows the line and exits 1.
ONE_LINE_EXIT = 3
