"""What a learned method reads to learn a merge, as the toolbox sees it: ``Parts`` (the
tensors and the runnable model) and ``LearnInputs``, the interface a caller implements
(``zoo.merge.learning.PlanInputs`` does, from a merge plan). The methods depend on
this interface, never on the plan-level code that implements it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from zoo.checkpoints.prompts import Prompt
from zoo.textgen import TextCodec

from zoo.merge.learned.generative_parity import DecodeCache
from zoo.merge.learned.parity import Log, TeacherFactory
from zoo.merge.learned.runtime import Body
from zoo.merge.learned.start import Start
from zoo.merge.learned.train import Forward, Report, TaskData


@dataclass
class Parts:
    """What every learned merge reads: the base's merged tensors, each expert's task
    vector, the runnable body and each task's head."""

    names: list[str]
    base: dict[str, torch.Tensor]
    task_vectors: list[dict[str, torch.Tensor]]
    body: Body
    heads: list[dict[str, torch.Tensor]]
    forward: Forward


class LearnInputs(Protocol):
    """A learned method's inputs, asked for in the order the method needs them."""

    device: torch.device
    report: Report | None
    log: Log | None

    @property
    def options(self) -> dict[str, Any]: ...

    @property
    def seed(self) -> int: ...

    @property
    def autocast(self) -> bool: ...

    @property
    def pad_id(self) -> int: ...

    def task_data(self, objective: str, split: str | None) -> list[TaskData]: ...

    def eval_data(self, split: str | None) -> list[TaskData | None]: ...

    def prompts(self, split: str) -> list[list[Prompt]] | None: ...

    def codec(self) -> TextCodec: ...

    def task_names(self) -> list[str]: ...

    def parts(self) -> Parts: ...

    def teachers(self, parts: Parts) -> tuple[list[TeacherFactory], list[str]]: ...

    def decode_cache(self, sources: list[str], sizes: list[int], max_new_tokens: int,
                     sampled: bool) -> DecodeCache | None: ...

    def start(self, spec: str, task_vectors: list[dict[str, torch.Tensor]]) -> Start: ...
