"""Generative task data: JSONL files of prompts, with optional reference answers.

A generative task is a set of prompts (an unlabeled pool) with optional reference
answers for evaluation, one JSON object per line, in one of two forms:

- plain: ``{"prompt": "...", "answer": "..."}`` (answer optional);
- chat: ``{"messages": [{"role": "user", "content": "..."}, ...]}``, rendered with the
  base model's chat template; a last ``assistant`` message is the reference answer.

A line may also name its ``split`` (``pool``, ``val``, ``test``, ...; ``pool`` when it
names none), so one file holds every split of a task: that is the file a registered
generative task stores (``write_task_prompts``). Reading checks every line before
returning anything, so a bad file gives one clear error and no partial result.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from zoo.errors import PromptDataError

FORMAT = "zoo-prompts-jsonl-v1"
DEFAULT_SPLIT = "pool"
ROLES = ("system", "user", "assistant")
MAX_LINE = 1 << 20  # one record; a longer line is refused, not parsed


@dataclass(frozen=True)
class Prompt:
    """One record: the prompt the model continues (plain text, or chat ``messages``,
    each a ``(role, content)`` pair), and the reference answer if known."""

    prompt: str
    answer: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None

    @property
    def is_chat(self) -> bool:
        return self.messages is not None


def _row(r: Prompt, split: str | None) -> dict:
    row: dict = {"split": split} if split is not None else {}
    if r.messages is not None:
        msgs = [{"role": role, "content": content} for role, content in r.messages]
        if r.answer is not None:
            msgs.append({"role": "assistant", "content": r.answer})
        row["messages"] = msgs
    else:
        row["prompt"] = r.prompt
        if r.answer is not None:
            row["answer"] = r.answer
    return row


def _write(path: Path, rows: Iterable[dict]) -> int:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def write_prompts(path: Path, records: Iterable[Prompt]) -> int:
    """Write records as JSONL atomically (temp file, then rename); return how many."""
    return _write(path, (_row(r, None) for r in records))


def write_task_prompts(path: Path, splits: Mapping[str, Iterable[Prompt]]) -> int:
    """Write every split of a task into one JSONL file (each line names its split)."""
    return _write(path, (_row(r, split) for split, rows in splits.items() for r in rows))


def _messages(value, where: str) -> tuple[tuple[tuple[str, str], ...], str | None]:
    if not isinstance(value, list) or not value:
        raise PromptDataError(f"{where}: \"messages\" must be a non-empty list of {{\"role\", \"content\"}} objects")
    out = []
    for m in value:
        if not isinstance(m, dict) or set(m) != {"role", "content"}:
            raise PromptDataError(f"{where}: each message must be an object with exactly \"role\" and \"content\"")
        if m["role"] not in ROLES:
            raise PromptDataError(f"{where}: message role {str(m['role'])[:20]!r} is not one of {', '.join(ROLES)}")
        if not isinstance(m["content"], str):
            raise PromptDataError(f"{where}: a message's \"content\" must be a string")
        out.append((m["role"], m["content"]))
    answer = None
    if out[-1][0] == "assistant":
        answer = out.pop()[1]
    if not out or out[-1][0] != "user":
        raise PromptDataError(f"{where}: the messages must end with a user turn (then, optionally, the "
                              "assistant's reference answer)")
    return tuple(out), answer


def _parse(line: str, where: str) -> tuple[str, Prompt]:
    if len(line) > MAX_LINE:
        raise PromptDataError(f"{where}: the line is over {MAX_LINE} characters")
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, RecursionError) as e:
        msg = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else "nested too deep"
        raise PromptDataError(f"{where}: invalid JSON ({msg})") from None
    if not isinstance(row, dict):
        raise PromptDataError(f"{where}: expected an object like {{\"prompt\": ..., \"answer\": ...}}")
    split = row.get("split", DEFAULT_SPLIT)
    if not isinstance(split, str) or not split or not split.replace("_", "").replace("-", "").isalnum():
        raise PromptDataError(f"{where}: \"split\" must be a name like pool, val or test")
    if "messages" in row:
        unknown = sorted(set(row) - {"messages", "split"})
        if unknown:
            raise PromptDataError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))} beside \"messages\"")
        messages, answer = _messages(row["messages"], where)
        return split, Prompt("", answer, messages)
    prompt, answer = row.get("prompt"), row.get("answer")
    if prompt is None:
        raise PromptDataError(f"{where}: missing \"prompt\"")
    if not isinstance(prompt, str) or not prompt:
        raise PromptDataError(f"{where}: \"prompt\" must be a non-empty string")
    if answer is not None and not isinstance(answer, str):
        raise PromptDataError(f"{where}: \"answer\" must be a string")
    unknown = sorted(set(row) - {"prompt", "answer", "split"})
    if unknown:
        raise PromptDataError(f"{where}: unknown field(s) {', '.join(map(repr, unknown))}; "
                              "expected \"prompt\" and an optional \"answer\"")
    return split, Prompt(prompt, answer)


def _read_all(path: Path) -> list[tuple[int, str, Prompt]]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PromptDataError(f"{path}: no such prompt file") from None
    except UnicodeDecodeError as e:
        raise PromptDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise PromptDataError(f"{path}: cannot read it ({e.strerror})") from None
    out = []
    for no, line in enumerate(text.splitlines(), 1):
        if line.strip():
            split, p = _parse(line, f"{path}, line {no}")
            out.append((no, split, p))
    return out


def read_prompts(path: Path, *, split: str | None = None, lengths: Callable[[Prompt], tuple[int, int]] | None = None,
                 context: int | None = None) -> list[Prompt]:
    """Read a JSONL prompt file, checking every line; with ``split``, only that split's
    records (an error if it has none).

    With ``lengths`` (a record's prompt and answer lengths in tokens, as the model's
    tokenizer counts them: ``zoo.textgen.TextCodec.lengths``) and ``context`` (the
    model's maximum positions), a prompt and answer that together do not fit the context
    are refused, since the answer's log-likelihood could not be measured.
    """
    path = Path(path)
    rows = _read_all(path)
    if split is not None:
        have = sorted({s for _, s, _ in rows})
        rows = [r for r in rows if r[1] == split]
        if not rows and have:
            raise PromptDataError(f"{path}: no {split!r} split (it has {', '.join(have)})")
    out: list[Prompt] = []
    for no, _, p in rows:
        if lengths is not None and context is not None:
            p_len, a_len = lengths(p)
            where = f"{path}, line {no}"
            if a_len > context:
                raise PromptDataError(f"{where}: the answer is {a_len} tokens, longer than the model's context "
                                      f"of {context}")
            if p_len + a_len > context:
                raise PromptDataError(f"{where}: prompt and answer are {p_len + a_len} tokens, longer than the "
                                      f"model's context of {context}")
        out.append(p)
    if not out:
        raise PromptDataError(f"{path}: no prompts in it (an empty pool)")
    return out


def prompt_splits(path: Path) -> dict[str, int]:
    """Each split's number of records, for a whole task file (checked line by line)."""
    sizes: dict[str, int] = {}
    for _, split, _ in _read_all(path):
        sizes[split] = sizes.get(split, 0) + 1
    if not sizes:
        raise PromptDataError(f"{path}: no prompts in it (an empty pool)")
    return sizes


def is_prompt_file(path: Path) -> bool:
    """Whether a task data file is JSONL prompts (rather than a safetensors task file,
    whose first 8 bytes are a little-endian header length)."""
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    return head.startswith(b"{")


__all__ = ["DEFAULT_SPLIT", "FORMAT", "Prompt", "PromptDataError", "is_prompt_file", "prompt_splits",
           "read_prompts", "write_prompts", "write_task_prompts"]
