"""What the learned merges' optimisation loops share: task data, seeded batches, the
summed objective, the step history and the result (each method's loop is its
``fit``: AdaMerging, arXiv 2310.02575; Concrete subspace learning, arXiv 2312.06173).

Everything here works on tensors and callables, not on files: a ``forward(task, params,
batch)`` that returns logits, and per-task data. The registry-level pipeline
(``merge.learning``) builds those from checkpoints; research code can pass its
own, e.g. a CLIP image encoder with zero-shot text heads.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch

from zoo.errors import ZooError
from zoo.textgen import IGNORE

from zoo.merge.learned.distributed import current
from zoo.merge.learned.merger import Mask, Merger
from zoo.merge.learned.objectives import cross_entropy, entropy, loss as objective_loss, supervised  # noqa: F401

# forward(task index, merged parameters, batch of model inputs) -> logits. A forward may
# also have ``all(params, batches, tasks) -> [logits per batch] | None``: the shared body
# run once over every task's batch together (``merge.learned.runtime``); None where it
# cannot be.
Forward = Callable[[int, dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]
# report(step, total steps, loss, steps per second)
Report = Callable[[int, int, float, float], None]
# the loss is read back from the device (a synchronisation) every this many steps
LOG_EVERY = 10
# refresh(forward, merged params, max new tokens, device) -> {task index: its data anew}:
# generative tasks' teacher-forced greedy continuations by the current merge
# (merge.learned.generative). One refresh may serve several tasks, and runs once for them.
Refresh = Callable[[Any, dict[str, torch.Tensor], int, Any], dict[int, "TaskData"]]


def forward_all(forward: Forward, params: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]],
                tasks: list[int] | None = None) -> list[torch.Tensor]:
    """Task ``tasks[i]``'s logits on ``batches[i]`` (tasks 0, 1, ... by default): one
    pass over all of them where ``forward`` can, else one pass per task."""
    tasks = list(range(len(batches))) if tasks is None else tasks
    shared = getattr(forward, "all", None)
    out = shared(params, batches, tasks) if shared is not None and len(batches) > 1 else None
    return out if out is not None else [forward(t, params, b) for t, b in zip(tasks, batches)]


@dataclass
class TaskData:
    """One task's examples: model inputs (first dimension = examples) and, for the
    supervised objective, labels (a causal LM's: per token). ``refresh`` remakes them
    from the current merge every ``Settings.refresh_every`` steps (generative entropy)."""

    name: str
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None
    refresh: Refresh | None = None

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]


@dataclass
class Settings:
    """A learned merge's settings, every one resolved: ``LearnedMethod.settings`` fills
    them from the method's parameter table (its one set of defaults) and the recipe.
    A field is None where the method has no such setting."""

    objective: str  # entropy | ce
    steps: int  # optimisation steps (concrete_adamerging: stage 1)
    lr: float
    batch_size: int
    coefficients: str  # fixed | task | layer
    init: float  # starting (fixed: the) coefficient
    clamp: bool | None = None  # clamp coefficients to [0, 1] in the forward
    mask: str | None = None  # regex of the masked tensors; None: no mask
    temperature: float | None = None  # Concrete temperature (masked merges)
    stage2_steps: int | None = None  # concrete_adamerging's stage 2
    inner_lr: float | None = None  # concrete_adamerging's inner coefficient steps
    stage1_order: str | None = None  # concrete_adamerging: reference | reset_first
    final_mask: str | None = None  # masked merges: relaxed | bernoulli, the draw the saved model folds in
    max_new_tokens: int | None = None  # generative entropy: the greedy continuations' length
    refresh_every: int | None = None  # generative entropy: steps between continuations by the current merge
    seed: int = 0
    autocast: bool = False  # bf16 forward (CUDA)

    @property
    def masked(self) -> bool:
        return self.mask is not None

    def merger(self, base: dict[str, torch.Tensor], task_vectors: list[dict[str, torch.Tensor]],
               device: torch.device | str) -> Merger:
        """The trainable merge these settings describe."""
        extra = {"temperature": self.temperature} if self.temperature is not None else {}
        return Merger(base, task_vectors, coefficients=self.coefficients, init=self.init, clamp=bool(self.clamp),
                      mask=self.mask, device=device, **extra)


@dataclass
class Result:
    merged: dict[str, torch.Tensor]  # the final merged parameters (float32, CPU)
    coefficients: list[list[float]]  # [task][tensor]
    mask_bits: dict[str, torch.Tensor] | None  # the final mask draw, binary or relaxed (concrete methods)
    mask_logits: dict[str, torch.Tensor] | None = None  # the learned logits it was drawn from
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    steps_done: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)  # parity: per round and task
    offsets: dict[str, torch.Tensor] = field(default_factory=dict)  # parity: trained parameter offsets
    refreshes: int = 0  # generative entropy: how many times the continuations were remade

    @property
    def steps_per_second(self) -> float:
        return self.steps_done / self.seconds if self.seconds else 0.0


class Batches:
    """Shuffled, cycled batches per task, from one seeded generator."""

    def __init__(self, data: list[TaskData], batch_size: int, generator: torch.Generator, device):
        self.small = sum(t.nbytes for d in data for t in d.inputs.values()) <= 1 << 30  # small: move once
        if self.small:
            data = [self.placed(d, device) for d in data]
        self.data, self.bs, self.gen, self.device = data, batch_size, generator, device
        self.order = [torch.empty(0, dtype=torch.long) for _ in data]
        self.pos = [0] * len(data)
        self.sync = current()  # across processes: each draws the same batch and takes its rows
        # per task, at the last draw: (this process's rows, the batch's); its scored tokens and the
        # batch's for a causal LM's token labels across processes
        self.rows = [(0, 0)] * len(data)
        self.scored = [self.scored_per_row(d) for d in data]

    @staticmethod
    def placed(d: TaskData, device) -> TaskData:
        return TaskData(d.name, {k: v.to(device) for k, v in d.inputs.items()},
                        d.labels.to(device) if d.labels is not None else None, d.refresh)

    def replace(self, t: int, d: TaskData) -> None:
        """Task ``t``'s examples anew, as many as before: the shuffled order goes on."""
        if len(d) != len(self.data[t]):
            raise ZooError(f"task {d.name!r}: {len(d)} examples where there were {len(self.data[t])}")
        self.data[t] = self.placed(d, self.device) if self.small else d
        self.scored[t] = self.scored_per_row(d)

    def scored_per_row(self, d: TaskData) -> torch.Tensor | None:
        """Across processes, each row's scored tokens where the labels are a causal LM's
        (on the CPU, read once here rather than waiting for the device every step)."""
        if self.sync.world == 1 or d.labels is None or d.labels.dim() != 2:
            return None
        return (d.labels[:, 1:] != IGNORE).sum(dim=1).cpu()

    def next(self, t: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        d = self.data[t]
        if self.pos[t] + self.bs > len(self.order[t]):
            self.order[t] = torch.randperm(len(d), generator=self.gen)
            self.pos[t] = 0
        idx = self.order[t][self.pos[t]:self.pos[t] + self.bs]
        part = self.sync.share(len(idx))
        mine = idx[part]
        self.rows[t] = (len(mine), len(idx))
        scored = self.scored[t]
        if scored is not None:  # a causal LM's loss is a mean over scored tokens: a process's share is its tokens'
            scored = scored[idx]
            self.rows[t] = (int(scored[part].sum()), int(scored.sum()))
        idx = mine.to(next(iter(d.inputs.values())).device)
        self.pos[t] += self.bs
        inputs = {k: v[idx].to(self.device, non_blocking=True) for k, v in d.inputs.items()}
        labels = d.labels[idx].to(self.device) if d.labels is not None else None
        return inputs, labels


def validate(data: list[TaskData], objective: str, batch_size: int) -> None:
    for d in data:
        if len(d.inputs) == 0 or len(d) == 0:
            raise ZooError(f"task {d.name!r} has no data; give it unlabeled inputs")
        if supervised(objective) and d.labels is None:
            raise ZooError(f"objective ce needs labels, and task {d.name!r} has none; use objective entropy")
    if batch_size < 1:
        raise ZooError("batch size must be at least 1")


def _loss(merger_params: dict[str, torch.Tensor], forward: Forward, batches: Batches, objective: str,
          autocast: bool) -> torch.Tensor:
    """Σ over tasks of the objective on one batch each (one body pass where the forward
    shares it)."""
    drawn = [batches.next(t) for t in range(len(batches.data))]
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else nullcontext()
    with ctx:
        logits = forward_all(forward, merger_params, [inputs for inputs, _ in drawn])
    total = None
    for t, (out, (_, labels)) in enumerate(zip(logits, drawn)):
        loss = objective_loss(objective, out, labels)
        loss = batches.sync.weigh(loss, *batches.rows[t])
        total = loss if total is None else total + loss
    assert total is not None
    return total


def _check(loss: torch.Tensor | float, step: int, what: str) -> float:
    value = float(loss.detach()) if isinstance(loss, torch.Tensor) else float(loss)
    if not math.isfinite(value):
        raise ZooError(f"the {what} loss became {value} at step {step}; nothing was written. "
                       "Try a lower lr, objective ce, or fewer masked tensors")
    return value


class Loop:
    """What every learned merge's optimisation loop shares: seeded batches and mask
    noise, the summed objective over tasks, the step history, and the final merge."""

    def __init__(self, merger: Merger, forward: Forward, data: list[TaskData], s: Settings,
                 report: Report | None = None):
        validate(data, s.objective, s.batch_size)
        if len(data) != merger.n_tasks:
            raise ZooError(f"{merger.n_tasks} experts but data for {len(data)} tasks")
        self.merger, self.forward, self.s = merger, forward, s
        device = merger.base[merger.names[0]].device
        gen = torch.Generator().manual_seed(s.seed)  # batches
        self.noise = torch.Generator(device=device).manual_seed(s.seed)  # mask draws, on the mask's device
        torch.manual_seed(s.seed)
        self.batches = Batches(data, s.batch_size, gen, device)
        self.report = report or (lambda *a: None)
        self.sync = self.batches.sync  # the loops call sync.reduce(opt, loss) after each backward
        self.history: list[dict[str, float]] = []
        self.t0 = time.perf_counter()
        self.done = 0
        # steps whose loss is still on the device: (step, total, loss, extra)
        self.pending: list[tuple[int, int, torch.Tensor, dict[str, float]]] = []
        self.refreshed = -1  # steps done when the data was last remade (refresh)
        self.refreshes = 0

    def objective(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Σ over tasks of the objective on one batch each, left on the device."""
        self.refresh(params)
        return _loss(params, self.forward, self.batches, self.s.objective, self.s.autocast)

    def refresh(self, params: dict[str, torch.Tensor]) -> None:
        """Remake the tasks that refresh (a generative task's continuations by the merge
        ``params``) before the first step and every ``refresh_every`` steps after."""
        every = self.s.refresh_every or 0
        if self.done == self.refreshed or (self.refreshed >= 0 and (every < 1 or self.done % every)):
            return
        if not any(d.refresh is not None for d in self.batches.data):
            return
        self.refreshed = self.done
        self.refreshes += 1
        device = self.merger.base_flat.device
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if self.s.autocast else nullcontext()
        refreshes: list[Refresh] = []
        for d in self.batches.data:
            if d.refresh is not None and not any(d.refresh is r for r in refreshes):
                refreshes.append(d.refresh)
        with torch.no_grad(), ctx:
            for r in refreshes:
                for t, fresh in r(self.forward, params, self.s.max_new_tokens or 0, device).items():
                    self.batches.replace(t, fresh)

    def loss(self, params: dict[str, torch.Tensor], step: int) -> tuple[torch.Tensor, float]:
        """The objective and its value (a one-line error where it is not finite). Reading
        the value waits for the device: the loops use ``objective`` and ``tick``."""
        loss = self.objective(params)
        return loss, _check(loss, step, self.s.objective)

    def tick(self, step: int, total: int, loss: torch.Tensor, **extra: float) -> None:
        """Record a step's loss. It is read back (and checked finite) every ``LOG_EVERY``
        steps and at the last, not every step: reading it waits for the device."""
        self.done += 1
        self.pending.append((step, total, loss.detach(), extra))
        if step == 1 or step % LOG_EVERY == 0 or step == total:
            self.flush()

    def flush(self) -> None:
        """Read back the pending losses in one transfer; a one-line error at the first
        that is not finite (nothing has been written)."""
        if not self.pending:
            return
        values = torch.stack([x.float().reshape(()) for _, _, x, _ in self.pending]).tolist()
        for (step, _, _, extra), value in zip(self.pending, values):
            _check(value, step, self.s.objective)
            self.history.append({"step": step, "loss": value, **extra})
        step, total = self.pending[-1][:2]
        self.pending = []
        self.report(step, total, values[-1], self.done / max(time.perf_counter() - self.t0, 1e-9))

    def result(self, final_mask: Mask | None = None,
               mask_bits: dict[str, torch.Tensor] | None = None) -> Result:
        """The merge after the loop (with ``final_mask`` applied), checked finite."""
        self.flush()
        seconds = time.perf_counter() - self.t0
        merger = self.merger
        with torch.no_grad():
            merged = {n: t.detach().float().cpu() for n, t in merger.merged(final_mask).items()}
        for n, t in merged.items():
            if not torch.isfinite(t).all():
                raise ZooError(f"the merged tensor {n} has NaN or infinite values; nothing was written")
        return Result(merged, merger.coefficients_list(), mask_bits and {n: b.cpu() for n, b in mask_bits.items()},
                      {n: x.cpu() for n, x in merger.logits_dict().items()} if mask_bits else None,
                      self.history, seconds, self.done, refreshes=self.refreshes)


def adam(params: list[torch.Tensor], lr: float) -> torch.optim.Adam:
    """The papers' optimiser: Adam with betas (0.9, 0.999)."""
    return torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, steps: int = 100) -> float:
    """The temperature T minimising the cross-entropy of softmax(logits / T) (temperature
    scaling, Guo et al. 2017), fitted by L-BFGS on log T."""
    logits, labels = logits.detach().float(), labels.detach()
    log_t = torch.zeros((), requires_grad=True, device=logits.device)
    opt = torch.optim.LBFGS([log_t], lr=0.1, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_t.detach().exp())


def calibrated(forward: Forward, merger: Merger, data: list[TaskData]) -> tuple[Forward, list[float]]:
    """Each task's head, temperature-scaled on its own expert (θ₀ + τ_t) and labelled
    data, so that prediction entropy means the same thing for every task."""
    temps = []
    with torch.no_grad():
        for t, d in enumerate(data):
            if d.labels is None:
                raise ZooError(f"calibrating task {d.name!r} needs labels (a validation split)")
            params = {n: merger.base[n] + merger.tv[n][t] for n in merger.names}
            device = merger.base[merger.names[0]].device
            logits = torch.cat([forward(t, params, {k: v[i:i + 256].to(device) for k, v in d.inputs.items()})
                                for i in range(0, len(d), 256)])
            temps.append(fit_temperature(logits, d.labels.to(device)))

    def scaled(task: int, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return forward(task, params, batch) / temps[task]

    shared = getattr(forward, "all", None)
    if shared is not None:  # keep the one body pass over every task's batch
        def scaled_all(params: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]],
                       tasks: list[int] | None = None) -> list[torch.Tensor] | None:
            tasks = list(range(len(batches))) if tasks is None else tasks
            out = shared(params, batches, tasks)
            return None if out is None else [x / temps[t] for t, x in zip(tasks, out)]
        scaled.all = scaled_all  # type: ignore[attr-defined]
    return scaled, temps
