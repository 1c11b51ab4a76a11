"""Synthetic text tasks with checkable answers, for the LLM demo zoo.

Every prompt is ``<tag>:<input>=`` and its answer a short string, so exact match is the
natural score. The tasks transform the same kind of input (short lowercase strings)
in conflicting ways, which is what makes their task vectors interfere when merged.
Generation uses Python's ``random.Random`` only, so the prompts are the same on every
platform and library version.
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable

from zoo.checkpoints.prompts import Prompt

LETTERS = string.ascii_lowercase
# Every character a prompt or answer can hold; the demo's tokenizer is one token per character.
ALPHABET = string.digits + string.ascii_lowercase + string.ascii_uppercase + ":=+"


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(LETTERS) for _ in range(rng.randint(lo, hi)))


def _add(rng: random.Random) -> Prompt:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return Prompt(f"add:{a}+{b}=", str(a + b))


def _rev(rng: random.Random) -> Prompt:
    w = _word(rng, 3, 6)
    return Prompt(f"rev:{w}=", w[::-1])


def _sort(rng: random.Random) -> Prompt:
    w = _word(rng, 3, 6)
    return Prompt(f"srt:{w}=", "".join(sorted(w)))


def _caesar(rng: random.Random) -> Prompt:
    w = _word(rng, 3, 6)
    return Prompt(f"rot:{w}=", "".join(LETTERS[(LETTERS.index(c) + 3) % 26] for c in w))


def _upper(rng: random.Random) -> Prompt:
    w = _word(rng, 3, 6)
    return Prompt(f"up:{w}=", w.upper())


def _count(rng: random.Random) -> Prompt:
    w = "".join(rng.choice("abc") for _ in range(rng.randint(3, 9)))
    return Prompt(f"cnt:{w}=", str(w.count("a")))


# name -> (what it does, generator)
TASKS: dict[str, tuple[str, Callable[[random.Random], Prompt]]] = {
    "add": ("2-digit addition", _add),
    "rev": ("reverse a string", _rev),
    "sort": ("sort a string's letters", _sort),
    "caesar": ("Caesar shift by 3", _caesar),
    "upper": ("copy in upper case", _upper),
    "count": ("count the a's", _count),
}


def sample(task: str, rng: random.Random) -> Prompt:
    """One random prompt of ``task``, with its answer."""
    return TASKS[task][1](rng)


def held_out(task: str, sizes: dict[str, int], seed: int) -> dict[str, list[Prompt]]:
    """Disjoint splits of distinct prompts (e.g. pool/val/test), drawn from their own seed."""
    rng = random.Random(f"{task}/held-out/{seed}")
    seen: set[str] = set()
    out: dict[str, list[Prompt]] = {}
    for split, n in sizes.items():
        rows: list[Prompt] = []
        tries = 0
        while len(rows) < n:
            tries += 1
            if tries > 100 * n + 1000:
                raise ValueError(f"task {task} has too few distinct prompts for {sizes}")
            p = sample(task, rng)
            if p.prompt not in seen:
                seen.add(p.prompt)
                rows.append(p)
        out[split] = rows
    return out


__all__ = ["ALPHABET", "TASKS", "held_out", "sample"]
