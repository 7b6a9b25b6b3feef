"""The one exception a user can cause, and how scripts turn it into a one-line message.

Anything raised as `UserError` is the user's to fix (missing data, an unknown name, a bad run
folder, a corrupt file, a full disk): scripts print its message on stderr, without a traceback,
and exit with status 2. Every other exception is a bug and keeps its traceback. `ArgumentParser`
reports a bad flag the same way: one line, status 2.
"""
import argparse
import shutil
import sys
import textwrap
from typing import Callable, NoReturn


STOPPED = 128 + 15  # the exit status of train.py stopped by SIGTERM (15) after an epoch, its files written


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


def run_cli(main: Callable[[object], int | None], parse_args: Callable[[], object]) -> int:
    """Run a script's `main(parse_args())`, turning a `UserError` into `error: ...` and exit code 2."""
    try:
        return main(parse_args()) or 0
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue where it stopped", file=sys.stderr)
        return 130
