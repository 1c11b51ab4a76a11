"""Learned merges over causal LMs: a generative task's prompts as the learning loop's
data, for the two objectives.

- ``ce`` (supervised): each prompt with its reference answer, teacher-forced; the loss
  is the token cross-entropy of the answer (and its end token), the prompt masked:
  the SFT objective fusion_bench's AdaMerging for Llama optimises.
- ``entropy`` (label-free): each prompt with the *current merge's* greedy continuation,
  teacher-forced; the loss is the mean entropy of the next-token distributions at the
  continuation's positions, averaged over positions and prompts (AdaMerging's entropy,
  arXiv 2310.02575, carried to next-token prediction). The continuations are remade by
  the merge being learned every ``refresh_every`` steps (``train.Loop.refresh``) and
  teacher-forced in between; reference answers are never read.

Every task's rows are right-padded to one length, so the shared body runs every task's
batch in one pass (``runtime.ModelForward.all``). Right padding needs no attention
mask: a causal model never looks ahead at the pads, and their labels are not scored.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from zoo.checkpoints.prompts import Prompt
from zoo.errors import ZooError
from zoo.textgen import TextCodec, generate, teacher_forced

from zoo.merge.learned.objectives import supervised
from zoo.merge.learned.train import TaskData

# Greedy continuations of the pool prompts: how many new tokens at most (the first
# N ≈ 16-32 generated tokens, the lower end: short-answer tasks end well before).
MAX_NEW_TOKENS = 16
# Steps between two continuations by the current merge. At lr 1e-3 Adam moves a
# coefficient by at most ~1e-3 a step, so 25 steps move it by ≤ 0.025, a small share
# of the λ range over which greedy answers change; regenerating costs about as much
# as a few steps (bench/llm_learned.py measures it).
REFRESH_EVERY = 25
GENERATE_BATCH = 256  # prompts per decoding batch


@dataclass
class Continuations:
    """Every generative task's prompts, continued greedily by the merge being learned:
    the one ``TaskData.refresh`` of all the tasks. Where every task runs the same model
    (a causal LM has no task heads) all prompts decode together, in as few batches as
    their lengths allow. Every task pads to one length: ``longest`` (the longest prompt
    of any task) plus the new tokens, within the context."""

    names: list[str]
    prompts: list[list[list[int]]]  # [task][prompt] token ids
    eos_id: int
    pad_id: int
    context: int | None = None

    @property
    def longest(self) -> int:
        return max(len(p) for task in self.prompts for p in task)

    def length(self, max_new_tokens: int) -> int:
        n = self.longest + max_new_tokens
        return n if self.context is None else min(n, self.context)

    def placeholders(self) -> list[TaskData]:
        """The prompts alone: the loop continues them before its first step."""
        out = []
        for name, prompts in zip(self.names, self.prompts):
            batch = teacher_forced(prompts, [[] for _ in prompts], self.pad_id, length=self.longest)
            out.append(TaskData(name, {"input_ids": batch["input_ids"]}, None, self))
        return out

    def __call__(self, forward: Any, params: dict[str, torch.Tensor], max_new_tokens: int,
                 device: Any) -> dict[int, TaskData]:
        def decode(task: int, prompts: list[list[int]]) -> list[list[int]]:
            gens = generate(lambda b: forward(task, params, b), prompts, self.eos_id, max_new_tokens,
                            batch_size=GENERATE_BATCH, context=self.context, device=device)
            # the end token is scored where the merge chose it: stopping is a prediction too
            return [list(g.tokens) + ([self.eos_id] if g.ended else []) for g in gens]

        if getattr(forward, "one_model", False):
            flat = decode(0, [p for task in self.prompts for p in task])
            answers, at = [], 0
            for task in self.prompts:
                answers.append(flat[at:at + len(task)])
                at += len(task)
        else:
            answers = [decode(t, task) for t, task in enumerate(self.prompts)]
        length = self.length(max_new_tokens)
        out = {}
        for t, (name, prompts, task_answers) in enumerate(zip(self.names, self.prompts, answers)):
            batch = teacher_forced(prompts, task_answers, self.pad_id, length=length)
            out[t] = TaskData(name, {"input_ids": batch["input_ids"]}, batch["labels"], self)
        return out


def prompt_task_data(names: Sequence[str], prompts: Sequence[Sequence[Prompt]], codec: TextCodec, objective: str,
                     split: str) -> list[TaskData]:
    """Each generative task's data for ``objective``: teacher-forced reference answers
    (``ce``), or prompts the loop continues with the merge being learned (``entropy``)."""
    context = codec.context
    for name, rows in zip(names, prompts):
        if not rows:
            raise ZooError(f"task {name!r} has no prompts in its {split!r} split")
    ids = [[codec.prompt_ids(p) for p in rows] for rows in prompts]
    if not supervised(objective):
        for name, task_ids in zip(names, ids):
            for k, p in enumerate(task_ids, 1):
                if context is not None and len(p) >= context:
                    raise ZooError(f"task {name!r}, {split} prompt {k}: {len(p)} tokens leave no room for an "
                                   f"answer in the model's context of {context}")
        return Continuations(list(names), ids, codec.eos_id, codec.pad_id, context).placeholders()
    answers = []
    for name, rows, task_ids in zip(names, prompts, ids):
        task_answers = []
        for k, (p, pid) in enumerate(zip(rows, task_ids), 1):
            if p.answer is None:
                raise ZooError(f"objective ce needs reference answers, and {split} prompt {k} of task {name!r} "
                               "has none; give every prompt an answer, or use objective entropy")
            a = codec.answer_ids(p.answer)
            if context is not None and len(pid) + len(a) > context:
                raise ZooError(f"task {name!r}, {split} prompt {k}: prompt and answer are {len(pid) + len(a)} "
                               f"tokens, longer than the model's context of {context}")
            task_answers.append(a)
        answers.append(task_answers)
    length = max(len(p) + len(a) for task_ids, task_answers in zip(ids, answers)
                 for p, a in zip(task_ids, task_answers))
    out = []
    for name, task_ids, task_answers in zip(names, ids, answers):
        batch = teacher_forced(task_ids, task_answers, codec.pad_id, length=length)
        out.append(TaskData(name, {"input_ids": batch["input_ids"]}, batch["labels"]))
    return out


def is_generative(data: Sequence[TaskData]) -> bool:
    """Whether learned-merge data is a generative task's (per-token labels or continuations)."""
    return any(d.refresh is not None or (d.labels is not None and d.labels.dim() == 2) for d in data)


__all__ = ["Continuations", "MAX_NEW_TOKENS", "REFRESH_EVERY", "is_generative", "prompt_task_data"]
