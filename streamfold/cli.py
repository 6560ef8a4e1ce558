"""What ``python -m worker`` and ``python -m producer`` share: exit statuses, one line per error, and a bad
flag answered with the usage of the command it was given to.

Every command exits with one of these; an error is one line on standard error (its traceback too with
``--debug``)::

    0    done: the request completed, the pool is served, the records were printed
    1    the answer is no: the request failed or ended incomplete, the pool is not served, no such result
    2    usage or settings that cannot work: a bad flag, a STREAMFOLD_* value that cannot be read
    3    follow: what was printed was superseded by a retried upstream call
    4    Redis cannot be reached or cannot serve for now (refused connection, timeout, loading): try again
    5    Redis refused: a wrong password or user, an ACL rule, a database index it does not have, a server
         that is not Redis, a key of the wrong type - retrying will not help
    70   a fault in Streamfold itself: the line says so; --debug shows where
    130  interrupted
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback
from collections.abc import Callable, Sequence

import redis

from streamfold.connection import cannot_serve
from streamfold.errors import ConfigError, RedisRefused, RedisUnavailable, StreamfoldError
from streamfold.settings import Settings

OK, NO, USAGE, SUPERSEDED, REDIS_UNAVAILABLE, REDIS_REFUSED, INTERNAL, INTERRUPTED = 0, 1, 2, 3, 4, 5, 70, 130

DEBUG_HELP = "on an error, print its traceback too (default: one line)"


def debug_flag() -> argparse.ArgumentParser:
    """A parent parser giving a command ``--debug`` (left unset, so that the top level's value stands)."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
    return parent


def settings_help(names: Sequence[str]) -> str:
    """The ``STREAMFOLD_*`` settings a command reads, with their defaults: the epilog of its ``--help``."""
    lines = ["settings (environment):"]
    for name in names:
        field = Settings.model_fields[name]
        default = field.get_default(call_default_factory=True)
        shown = "off" if default is None else "none" if default == {} else default
        lines.append(f"  STREAMFOLD_{name.upper():<24} {field.description} (default: {shown})")
    return "\n".join(lines)


def exit_help() -> str:
    """The exit statuses, for the top level's ``--help``."""
    return "exit statuses:\n" + (__doc__ or "").split("::\n\n", 1)[1].rstrip()


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse ``argv``; an argument the chosen command does not take gets that command's usage, not the
    top level's (each subparser sets ``parser`` in its defaults)."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        command: argparse.ArgumentParser = getattr(args, "parser", parser)
        command.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def exit_status(exc: BaseException) -> int:
    """The exit status an error calls for (see the module docstring)."""
    if isinstance(exc, ConfigError):
        return USAGE
    if isinstance(exc, RedisUnavailable):
        return REDIS_UNAVAILABLE
    if isinstance(exc, RedisRefused):
        return REDIS_REFUSED
    if isinstance(exc, redis.RedisError):
        return REDIS_UNAVAILABLE if cannot_serve(exc) else REDIS_REFUSED
    if isinstance(exc, (StreamfoldError, OSError)):
        return NO
    return INTERNAL


def describe(exc: BaseException) -> str:
    """An error as one line a user can act on."""
    if isinstance(exc, redis.RedisError) and not isinstance(exc, StreamfoldError):
        kind = "unavailable" if cannot_serve(exc) else "refused"
        return f"Redis {kind}: {type(exc).__name__}: {exc}"
    if isinstance(exc, OSError) and not isinstance(exc, redis.RedisError):
        return f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc) or type(exc).__name__
    if isinstance(exc, StreamfoldError):
        return str(exc)
    return f"internal error: {type(exc).__name__}: {exc} (run with --debug for the traceback)"


def run(prog: str, command: Callable[[], int], *, debug: bool = False, quiet_interrupt: bool = False) -> int:
    """Run a command, turning any error into one line on stderr and its exit status."""
    try:
        return command()
    except KeyboardInterrupt:
        return OK if quiet_interrupt else INTERRUPTED
    except BrokenPipeError:
        # The reader of stdout went away (``| head``); send what is left to nowhere instead of failing on exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return OK
    except Exception as exc:  # noqa: BLE001  (every error ends as one line; --debug adds the traceback)
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {' '.join(describe(exc).split())}", file=sys.stderr)
        return exit_status(exc)
