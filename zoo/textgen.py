"""Causal language models as zoo runs them: prompts and answers to token ids, greedy
(or sampled) decoding, and the reference answer's log-likelihood.

Everything here works over a ``logits(batch) -> [batch, positions, vocabulary]``
callable, so the same code drives a ``transformers`` model (``zoo eval``) and a merge
candidate called through ``torch.func.functional_call`` (learned merges, parity).

Conventions, as in ``transformers``: a teacher-forced batch is right-padded, and its
``labels`` equal ``input_ids`` on the answer's tokens (and the end-of-sequence token
after them) and -100 elsewhere; position t's logits predict token t + 1. Decoding
groups prompts by token length, so no prompt is ever padded: every row of a decoding
batch is exactly what the model would see alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from zoo.checkpoints.prompts import Prompt
from zoo.errors import PromptDataError, ZooError

LogitsFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
IGNORE = -100  # a label position that is not scored


@dataclass
class TextCodec:
    """A base model's tokenizer, as generative tasks use it: prompt ids (with the
    tokenizer's own special tokens, or the chat template), answer ids (plain tokens,
    then end-of-sequence) and decoding."""

    tokenizer: Any
    eos_id: int
    pad_id: int
    context: int | None = None  # the model's maximum positions, when known

    @classmethod
    def from_folder(cls, folder: str | Path, context: int | None = None) -> "TextCodec":
        """The tokenizer saved in a model folder (``AutoTokenizer``; never remote code)."""
        folder = Path(folder)
        if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
            raise ZooError(f"generative tasks need the base model's tokenizer, and {folder} has no tokenizer files")
        import transformers
        from transformers import AutoTokenizer

        transformers.utils.logging.disable_progress_bar()
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
        except (OSError, ValueError, TypeError) as e:
            raise ZooError(f"transformers cannot load the tokenizer in {folder} ({' '.join(str(e).split())[:160]})") \
                from None
        eos = tok.eos_token_id
        if eos is None:
            raise ZooError(f"the tokenizer in {folder} has no end-of-sequence token, so an answer has no end")
        pad = tok.pad_token_id if tok.pad_token_id is not None else eos
        return cls(tok, int(eos), int(pad), context)

    def prompt_ids(self, p: Prompt) -> list[int]:
        if p.messages is not None:
            if not getattr(self.tokenizer, "chat_template", None):
                raise PromptDataError("chat-format prompts need the base model's chat template, and its tokenizer "
                                      "has none; write {\"prompt\": ...} lines instead")
            text = self.tokenizer.apply_chat_template([{"role": r, "content": c} for r, c in p.messages],
                                                      add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(p.prompt)["input_ids"])

    def answer_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [self.eos_id]

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def lengths(self, p: Prompt) -> tuple[int, int]:
        """A record's prompt and answer lengths in tokens (the answer's with its end token)."""
        return len(self.prompt_ids(p)), len(self.answer_ids(p.answer)) if p.answer is not None else 0


def teacher_forced(prompts: Sequence[Sequence[int]], answers: Sequence[Sequence[int]], pad_id: int,
                   length: int | None = None) -> dict[str, torch.Tensor]:
    """``prompt + answer`` per row, right-padded to the longest row (or ``length``):
    ``input_ids``, ``attention_mask``, and ``labels`` scoring the answer's tokens only."""
    rows = [list(p) + list(a) for p, a in zip(prompts, answers)]
    n = max([len(r) for r in rows] + [length or 0])
    ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), n), dtype=torch.long)
    labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
    for i, (p, r) in enumerate(zip(prompts, rows)):
        ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, :len(r)] = 1
        labels[i, len(p):len(r)] = ids[i, len(p):len(r)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def scored(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The logits that predict each scored label, the labels, and each one's row:
    (``[N, vocabulary]``, ``[N]``, ``[N]``), in row-major order."""
    pred, target = logits[:, :-1], labels[:, 1:]
    keep = target != IGNORE
    rows = torch.arange(labels.shape[0], device=labels.device)[:, None].expand_as(target)
    return pred[keep], target[keep], rows[keep]


def answer_loglik(logits_fn: LogitsFn, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-likelihood of its scored labels, and how many there are."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits, target, rows = scored(logits_fn(inputs), batch["labels"])
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, target[:, None])[:, 0]
    n = batch["labels"].shape[0]
    total = torch.zeros(n, dtype=torch.float64, device=lp.device).index_add_(0, rows, lp.double())
    count = torch.zeros(n, dtype=torch.long, device=lp.device).index_add_(0, rows, torch.ones_like(rows))
    return total, count


@dataclass(frozen=True)
class Generated:
    """One continuation: its tokens (without the end token), whether it ended, and the
    mean probability the model gave each token it chose (the end token included)."""

    tokens: tuple[int, ...]
    ended: bool
    confidence: float


def generate(logits_fn: LogitsFn, prompts: Sequence[Sequence[int]], eos_id: int, max_new_tokens: int, *,
             temperature: float = 0.0, generator: torch.Generator | None = None, batch_size: int = 64,
             context: int | None = None, device: torch.device | str | None = None) -> list[Generated]:
    """Continue each prompt: greedy (``temperature`` 0) or sampled at ``temperature``
    from ``generator``. Stops at the end token, after ``max_new_tokens``, or at the
    ``context``. Each step reruns the whole prefix: at the lengths of short answers
    that costs less than keeping a cache, and any ``logits_fn`` works."""
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        if not p:
            raise ZooError("an empty prompt has nothing to continue")
        by_len.setdefault(len(p), []).append(i)
    out: list[Generated | None] = [None] * len(prompts)
    with torch.no_grad():
        for length in sorted(by_len):
            members = by_len[length]
            for s in range(0, len(members), batch_size):
                idx = members[s:s + batch_size]
                for i, g in zip(idx, _continue(logits_fn, [prompts[i] for i in idx], eos_id, max_new_tokens,
                                                temperature, generator, context, device)):
                    out[i] = g
    return out  # type: ignore[return-value]


def _continue(logits_fn: LogitsFn, prompts: list[Sequence[int]], eos_id: int, max_new_tokens: int,
              temperature: float, generator: torch.Generator | None, context: int | None,
              device) -> list[Generated]:
    ids = torch.tensor([list(p) for p in prompts], dtype=torch.long, device=device)
    n = ids.shape[0]
    done = torch.zeros(n, dtype=torch.bool, device=ids.device)
    steps = max_new_tokens if context is None else max(0, min(max_new_tokens, context - ids.shape[1]))
    chosen, probs = [], []
    for _ in range(steps):
        logits = logits_fn({"input_ids": ids, "attention_mask": torch.ones_like(ids)})[:, -1].float()
        p = torch.softmax(logits, dim=-1)
        if temperature > 0:
            q = torch.softmax(logits / temperature, dim=-1)
            nxt = torch.multinomial(q.cpu(), 1, generator=generator)[:, 0].to(ids.device)
        else:
            nxt = logits.argmax(-1)
        conf = p.gather(-1, nxt[:, None])[:, 0]
        nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
        chosen.append(nxt)
        probs.append(torch.where(done, torch.zeros_like(conf), conf))
        done = done | (nxt == eos_id)
        ids = torch.cat([ids, nxt[:, None]], 1)
        if bool(done.all()):
            break
    if not chosen:
        return [Generated((), False, 0.0) for _ in prompts]
    toks = torch.stack(chosen, 1).tolist()
    conf = torch.stack(probs, 1).double().tolist()
    out = []
    for row, c in zip(toks, conf):
        end = row.index(eos_id) if eos_id in row else len(row)
        used = c[:min(end + 1, len(row))]
        out.append(Generated(tuple(row[:end]), end < len(row), sum(used) / len(used) if used else 0.0))
    return out


def same_answer(a: str, b: str) -> bool:
    """Exact match for short answers: equal after trimming surrounding white space."""
    return a.strip() == b.strip()


__all__ = ["Generated", "IGNORE", "LogitsFn", "TextCodec", "answer_loglik", "generate", "same_answer", "scored",
           "teacher_forced"]
