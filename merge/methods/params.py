"""A merge method's parameters: each one a ``Param`` (its one default, the check its
value must pass, and a line of help), and the checks themselves.

A check takes a value and returns None when it is fine, else what is wrong with it
("must be a number"); ``validate_params`` turns that into a one-line error naming the
method and the parameter.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

Check = Callable[[Any], "str | None"]


class _Required:
    """The default of a parameter that has none: mergekit refuses a merge that leaves it out."""

    def __repr__(self) -> str:
        return "required"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Param:
    """One parameter: its default, the check its value must pass, and its help line."""

    default: Any
    check: Check | None = None
    doc: str = ""


def check_number(v: Any) -> str | None:
    """A finite int or float (not a bool)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return "must be a number"
    if math.isnan(v) or math.isinf(v):
        return "must be a finite number"
    return None


def check_density(v: Any) -> str | None:
    """A fraction in (0, 1]."""
    return check_number(v) or (None if 0 < v <= 1 else "must be in (0, 1]")


def check_unit(v: Any) -> str | None:
    """A fraction in [0, 1]."""
    return check_number(v) or (None if 0 <= v <= 1 else "must be in [0, 1]")


def check_positive(v: Any) -> str | None:
    """A number > 0."""
    return check_number(v) or (None if v > 0 else "must be > 0")


def check_bool(v: Any) -> str | None:
    """true or false."""
    return None if isinstance(v, bool) else "must be true or false"


def check_positive_int(v: Any) -> str | None:
    """A whole number >= 1."""
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 1 else "must be a whole number >= 1"


def check_non_negative_int(v: Any) -> str | None:
    """A whole number >= 0."""
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else "must be a whole number >= 0"


def check_choice(*options: str) -> Check:
    """One of ``options``."""
    def check(v: Any) -> str | None:
        return None if v in options else f"must be one of {', '.join(options)}"
    return check


def check_regex(v: Any) -> str | None:
    """A valid regular expression."""
    if not isinstance(v, str):
        return "must be a regular expression"
    try:
        re.compile(v)
    except re.error as e:
        return f"is not a valid regular expression ({e})"
    return None


def check_string(v: Any) -> str | None:
    """A non-empty string."""
    return None if isinstance(v, str) and v else "must be a non-empty string"


# mergekit 0.1.5 declares no weight for ram, ramplus_tl and sce: a recipe may give one
# (per model or global) and mergekit never reads it; so here.
IGNORED_WEIGHT = {"weight": Param(None, check_number, "accepted and ignored, as mergekit does: the method "
                                                      "weighs the models itself")}
