"""One error type for problems the user can fix (bad names, keys, paths, shapes, divergence).

The CLIs print these as a single line (`error: ...`) and exit with status 2; anything else
is a bug and keeps its traceback.
"""

from collections.abc import Mapping
from typing import TypeVar

T = TypeVar("T")


class UserError(ValueError):
    """A problem with the input (config, data, checkpoint), stated in one line."""


class TrainingDiverged(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """Training stopped on SIGTERM or SIGINT after checkpointing the step it was at; the CLIs
    print the message as one line and exit with `status` (128 + the signal's number)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


_PREPOSITIONS = ("with", "of", "for", "in", "on", "from")


def plural(kind: str) -> str:
    """The English plural of a kind of name: its head noun (the word before " with", " of",
    ...; else the last) takes -es after s, x, z, ch, sh, -ies for a consonant's y, else -s
    ("loss" -> "losses", "toy with a known density" -> "toys with a known density")."""
    words = kind.split(" ")
    head = next((i - 1 for i, w in enumerate(words) if i and w in _PREPOSITIONS), len(words) - 1)
    word = words[head]
    if word.endswith(("s", "x", "z", "ch", "sh")):
        word += "es"
    elif word.endswith("y") and word[-2:-1] not in ("", *"aeiou"):
        word = word[:-1] + "ies"
    else:
        word += "s"
    return " ".join([*words[:head], word, *words[head + 1 :]])


def lookup(table: Mapping[str, T], name: str, kind: str) -> T:
    """`table[name]`, or a UserError that lists the known names of this `kind`."""
    if name not in table:
        known = ", ".join(sorted(table))
        raise UserError(f"unknown {kind} {name!r}; known {plural(kind)}: {known}")
    return table[name]


def check_kwargs(fn_name: str, kwargs: Mapping, allowed) -> None:
    """Raise a UserError naming any keyword in `kwargs` that `fn_name` does not take."""
    unknown = sorted(set(kwargs) - set(allowed))
    if unknown:
        raise UserError(
            f"{fn_name} got unknown option(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(allowed))}"
        )
