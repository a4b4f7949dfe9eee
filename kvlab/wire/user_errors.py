"""User mistakes as one line that names the input and its fix, shared by every command.

``UserError`` is what any floor raises for input a person typed (a flag, a file, a name); the ``kvlab``
command prints it as one line and exits 2, without a traceback. It is a ValueError, so code that already
catches bad values keeps working. The argparse types below reject bad flag values the same way.
"""
from __future__ import annotations

import argparse
import difflib
from collections.abc import Callable, Iterable


class UserError(ValueError):
    """Input a person typed that cannot be used; the message says what to do instead."""


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest known name, else ''; meant to follow the unknown name."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def unknown_name(kind: str, name: str, choices: Iterable[str]) -> UserError:
    """'unknown routing policy 'kvaware' (did you mean 'kv_aware'?); known: a, b, c'."""
    known = list(choices)
    return UserError(f"unknown {kind} {name!r}{did_you_mean(name, known)}; known: {', '.join(known)}")


def number(kind: type = float, *, minimum: float = 0.0, inclusive: bool = False,
           what: str = "") -> Callable[[str], float]:
    """An argparse type: a number above `minimum` (or at least it, with `inclusive`)."""
    bound = f">= {minimum:g}" if inclusive else f"> {minimum:g}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}; "
                                             f"pass a number {bound}{what}") from None
        if value != value or value < minimum or (value == minimum and not inclusive):
            raise argparse.ArgumentTypeError(f"{text} is out of range; pass a number {bound}{what}")
        return value

    parse.__name__ = kind.__name__   # argparse names the type in its messages
    return parse


positive = number(float)
positive_int = number(int)
non_negative = number(float, inclusive=True)


def count_or_all(text: str) -> int | None:
    """An argparse type for --limit: a positive count, or 0 / 'all' for everything (None)."""
    if text.strip().lower() == "all":
        return None
    value = int(number(int, inclusive=True, what=", or 0 / 'all' for the whole trace")(text))   # already an int
    return value or None


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line naming the fix ('see --help'), exit 2, no usage block."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: {message}; see {self.prog} --help\n")
