"""The one exception type for mistakes a user can fix: shown as one line, never a traceback."""

# Exit status of a worker or command that stopped on a UserError.
USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad flags, config, data or environment: the message says what is wrong and what to do."""
