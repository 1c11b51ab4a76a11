"""Generative task data: JSONL files of ``{"prompt": ..., "answer": ...}`` records.

A generative task is a set of prompts (an unlabeled pool) with optional reference
answers for evaluation, one JSON object per line. Reading checks every line before
returning anything, so a bad file gives one clear error and no partial result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from zoo.errors import PromptDataError

FORMAT = "zoo-prompts-jsonl-v1"


@dataclass(frozen=True)
class Prompt:
    """One record: the prompt the model continues, and the reference answer if known."""

    prompt: str
    answer: str | None = None


def write_prompts(path: Path, records: Iterable[Prompt]) -> int:
    """Write records as JSONL atomically (temp file, then rename); return how many."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for r in records:
                row = {"prompt": r.prompt} if r.answer is None else {"prompt": r.prompt, "answer": r.answer}
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def read_prompts(path: Path, *, count_tokens: Callable[[str], int] | None = None,
                 context: int | None = None) -> list[Prompt]:
    """Read a JSONL prompt file, checking every line.

    With ``count_tokens`` (a tokenizer's length function) and ``context`` (the model's
    maximum positions), a prompt and answer that together do not fit the context are
    refused, since the answer's log-likelihood could not be measured.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptDataError(f"{path}: no such prompt file") from None
    except UnicodeDecodeError as e:
        raise PromptDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise PromptDataError(f"{path}: cannot read it ({e.strerror})") from None
    out: list[Prompt] = []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}, line {no}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptDataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise PromptDataError(f"{where}: expected an object like {{\"prompt\": ..., \"answer\": ...}}")
        prompt, answer = row.get("prompt"), row.get("answer")
        if prompt is None:
            raise PromptDataError(f"{where}: missing \"prompt\"")
        if not isinstance(prompt, str) or not prompt:
            raise PromptDataError(f"{where}: \"prompt\" must be a non-empty string")
        if answer is not None and not isinstance(answer, str):
            raise PromptDataError(f"{where}: \"answer\" must be a string")
        unknown = sorted(set(row) - {"prompt", "answer"})
        if unknown:
            raise PromptDataError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                                  "expected \"prompt\" and an optional \"answer\"")
        if count_tokens is not None and context is not None:
            p = count_tokens(prompt)
            a = count_tokens(answer) if answer is not None else 0
            if a > context:
                raise PromptDataError(f"{where}: the answer is {a} tokens, longer than the model's context "
                                      f"of {context}")
            if p + a > context:
                raise PromptDataError(f"{where}: prompt and answer are {p + a} tokens, longer than the model's "
                                      f"context of {context}")
        out.append(Prompt(prompt, answer))
    if not out:
        raise PromptDataError(f"{path}: no prompts in it (an empty pool)")
    return out


__all__ = ["FORMAT", "Prompt", "PromptDataError", "read_prompts", "write_prompts"]
