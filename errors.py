"""The one exception a user can cause, and how scripts turn it into a one-line message.

Anything raised as `UserError` is the user's to fix (missing data, an unknown name, a bad run
folder, a corrupt file, a full disk): scripts print its message on stderr, without a traceback,
and exit with status 2. Every other exception is a bug and keeps its traceback.
"""
import sys
from typing import Callable


class UserError(Exception):
    """An error the user can fix; its message says what is wrong and what to do."""


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
