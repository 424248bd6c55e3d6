"""How a command ends other than by success: a mistake the user can fix (one line, never a
traceback), and a stop by signal."""

import signal

# Exit status of a worker or command that stopped on a UserError.
USER_ERROR_EXIT = 2


class UserError(Exception):
    """Bad flags, config, data or environment: the message says what is wrong and what to do."""

# Exit status of a worker that stopped with a one-line message that is not the user's doing (a
# peer died or a collective timed out): the CLI shows the line and exits 1.
ONE_LINE_EXIT = 3


class Stopped(Exception):
    """SIGTERM reached this process (SIGINT raises KeyboardInterrupt, as usual)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def stop_on_signals() -> None:
    """Ctrl-C (SIGINT) and SIGTERM stop every command the same way: as exceptions that it turns
    into one line. SIGINT is set explicitly because a shell starts a script's background jobs
    with SIGINT ignored, and Python then leaves it ignored: `kill -INT` of a background `dptrain
    seq` or `sweep` did nothing, where ddp stopped (torchrun installs its own handlers)."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _raise_stopped)


def _raise_stopped(signum: int, _frame) -> None:
    raise Stopped(signum)
