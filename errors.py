"""The one exception a user can cause, and how scripts turn it into a one-line message.

Anything raised as `UserError` is the user's to fix (missing data, an unknown name, a bad run
folder, a corrupt file, a full disk): scripts print its message on stderr, without a traceback,
and exit with status 2. Every other exception is a bug and keeps its traceback. `ArgumentParser`
reports a bad flag the same way: one line, status 2.
"""
import argparse
import shutil
import signal
import sys
import textwrap
from typing import Callable, NoReturn


STOPPED = 128 + 15  # the exit status of train.py stopped by SIGTERM (15) after an epoch, its files written
INTERRUPTED = 128 + 2  # the exit status of a script stopped by Ctrl-C (SIGINT, 2)
INTERRUPTED_LINE = "interrupted: run the same command again to continue where it stopped"


class UserError(Exception):
    """An error the user can fix; its message says what is wrong and what to do."""


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: the module docstring as its description, and a bad flag as one line,
    `error: <what> (see <script> --help)`, with exit status 2. Its flags' groups keep their descriptions
    wrapped to the terminal, as the flags' help is (the docstring keeps its lines, examples included)."""

    def __init__(self, description: str | None, **kwargs):
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def add_argument_group(self, title: str | None = None, description: str | None = None, **kwargs):
        if description:  # indented by 2 in a help 2 narrower than the terminal, as argparse does
            description = textwrap.fill(description, max(shutil.get_terminal_size().columns - 4, 40))
        return super().add_argument_group(title, description, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def interrupt_quietly(module_name: str) -> None:
    """Called by a script before its other imports, of which torch's takes seconds: run as a script
    (`module_name` is "__main__"), Ctrl-C until `run_cli` starts ends it with run_cli's one line and status,
    not a traceback of the import machinery. Imported as a module (by a test), and where SIGINT is ignored
    (a background job), nothing changes."""
    if module_name == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        signal.signal(signal.SIGINT, _interrupted_while_starting)


def run_cli(main: Callable[[object], int | None], parse_args: Callable[[], object]) -> int:
    """Run a script's `main(parse_args())`, turning a `UserError` into `error: ...` and exit code 2, and
    Ctrl-C into one line and exit code 130."""
    if signal.getsignal(signal.SIGINT) is _interrupted_while_starting:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # from here, KeyboardInterrupt as usual
    try:
        return main(parse_args()) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED_LINE, file=sys.stderr)
        return INTERRUPTED


def _interrupted_while_starting(signum: int, frame) -> NoReturn:
    print(INTERRUPTED_LINE, file=sys.stderr)
    sys.exit(INTERRUPTED)
