"""The optimisation loops of the learned merges: AdaMerging, Concrete task arithmetic
and Concrete AdaMerging (AdaMerging, arXiv 2310.02575; Concrete subspace learning, arXiv 2312.06173).

Everything here works on tensors and callables, not on files: a ``forward(task, params,
batch)`` that returns logits, and per-task data. The registry-level pipeline
(``merge.learned.run``) builds those from checkpoints; research code can pass its own,
e.g. a CLIP image encoder with zero-shot text heads.
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

from zoo.merge.learned.merger import MaskSample, Merger, rescale
from zoo.merge.learned.objectives import cross_entropy, entropy, supervised

# forward(task index, merged parameters, batch of model inputs) -> logits
Forward = Callable[[int, dict[str, torch.Tensor], dict[str, torch.Tensor]], torch.Tensor]
# report(step, total steps, loss, steps per second)
Report = Callable[[int, int, float, float], None]


@dataclass
class TaskData:
    """One task's examples: model inputs (first dimension = examples) and, for the
    supervised objective, labels."""

    name: str
    inputs: dict[str, torch.Tensor]
    labels: torch.Tensor | None = None

    def __len__(self) -> int:
        return next(iter(self.inputs.values())).shape[0]


@dataclass
class Settings:
    method: str  # adamerging | concrete_ta | concrete_adamerging
    objective: str = "entropy"
    coefficients: str = "layer"  # task | layer (concrete_ta: fixed)
    steps: int = 500
    stage2_steps: int = 1000
    lr: float = 1e-3
    inner_lr: float = 1.0
    init: float = 0.3
    clamp: bool = False
    mask: str = ".*"
    temperature: float = 0.5
    batch_size: int = 16
    seed: int = 0
    autocast: bool = False  # bf16 forward (CUDA)

    def __post_init__(self) -> None:
        if self.method == "concrete_ta":  # the coefficients stay at init (λ); only the mask learns
            self.coefficients = "fixed"

    @property
    def masked(self) -> bool:
        return self.method in ("concrete_ta", "concrete_adamerging")

    def merger(self, base: dict[str, torch.Tensor], task_vectors: list[dict[str, torch.Tensor]],
               device: torch.device | str) -> Merger:
        """The trainable merge these settings describe."""
        return Merger(base, task_vectors, coefficients=self.coefficients, init=self.init, clamp=self.clamp,
                      mask=self.mask if self.masked else None, temperature=self.temperature, device=device)


@dataclass
class Result:
    merged: dict[str, torch.Tensor]  # the final merged parameters (float32, CPU)
    coefficients: list[list[float]]  # [task][tensor]
    mask_bits: dict[str, torch.Tensor] | None  # the final binary mask (concrete methods)
    mask_logits: dict[str, torch.Tensor] | None = None  # the learned logits it was drawn from
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    steps_done: int = 0
    rounds: list[dict[str, Any]] = field(default_factory=list)  # parity: per round and task
    offsets: dict[str, torch.Tensor] = field(default_factory=dict)  # parity: trained parameter offsets

    @property
    def steps_per_second(self) -> float:
        return self.steps_done / self.seconds if self.seconds else 0.0


class Batches:
    """Shuffled, cycled batches per task, from one seeded generator."""

    def __init__(self, data: list[TaskData], batch_size: int, generator: torch.Generator, device):
        if sum(t.nbytes for d in data for t in d.inputs.values()) <= 1 << 30:  # small: move once
            data = [TaskData(d.name, {k: v.to(device) for k, v in d.inputs.items()},
                             d.labels.to(device) if d.labels is not None else None) for d in data]
        self.data, self.bs, self.gen, self.device = data, batch_size, generator, device
        self.order = [torch.empty(0, dtype=torch.long) for _ in data]
        self.pos = [0] * len(data)

    def next(self, t: int) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        d = self.data[t]
        if self.pos[t] + self.bs > len(self.order[t]):
            self.order[t] = torch.randperm(len(d), generator=self.gen)
            self.pos[t] = 0
        idx = self.order[t][self.pos[t]:self.pos[t] + self.bs].to(next(iter(d.inputs.values())).device)
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
    """Σ over tasks of the objective on one batch each."""
    total = None
    for t in range(len(batches.data)):
        inputs, labels = batches.next(t)
        ctx = torch.autocast("cuda", dtype=torch.bfloat16) if autocast else nullcontext()
        with ctx:
            logits = forward(t, merger_params, inputs)
        loss = cross_entropy(logits, labels) if supervised(objective) else entropy(logits)
        total = loss if total is None else total + loss
    assert total is not None
    return total


def _check(loss: torch.Tensor, step: int, what: str) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise ZooError(f"the {what} loss became {value} at step {step}; nothing was written. "
                       "Try a lower lr, objective ce, or fewer masked tensors")
    return value


def learn(merger: Merger, forward: Forward, data: list[TaskData], s: Settings,
          report: Report | None = None) -> Result:
    """Run one learned merge and return its final parameters."""
    validate(data, s.objective, s.batch_size)
    if len(data) != merger.n_tasks:
        raise ZooError(f"{merger.n_tasks} experts but data for {len(data)} tasks")
    device = merger.base[merger.names[0]].device
    gen = torch.Generator().manual_seed(s.seed)  # batches
    noise = torch.Generator(device=device).manual_seed(s.seed)  # mask draws, on the mask's device
    torch.manual_seed(s.seed)
    batches = Batches(data, s.batch_size, gen, device)
    report = report or (lambda *a: None)
    history: list[dict[str, float]] = []
    t0 = time.perf_counter()
    done = 0

    def tick(step: int, total: int, loss: float, **extra: float) -> None:
        nonlocal done
        done += 1
        history.append({"step": step, "loss": loss, **extra})
        report(step, total, loss, done / max(time.perf_counter() - t0, 1e-9))

    mask_bits = None
    if s.method == "adamerging":
        opt = torch.optim.Adam([merger.weights], lr=s.lr, betas=(0.9, 0.999))
        for step in range(1, s.steps + 1):
            loss = _loss(merger.merged(), forward, batches, s.objective, s.autocast)
            value = _check(loss, step, s.objective)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tick(step, s.steps, value)
        final_mask: MaskSample | None = None
    elif s.method == "concrete_ta":
        opt = torch.optim.Adam([merger.logit_flat], lr=s.lr, betas=(0.9, 0.999))
        for step in range(1, s.steps + 1):
            loss = _loss(merger.merged(merger.sample(noise)), forward, batches, s.objective, s.autocast)
            value = _check(loss, step, s.objective)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tick(step, s.steps, value)
        mask_bits = merger.draw_bits(noise)
        final_mask = rescale(mask_bits)
    elif s.method == "concrete_adamerging":
        # Stage 1: alternate one inner Adam step on the coefficients (reset to init each
        # time, state kept) on a detached mask sample, and one Adam step on the mask
        # logits through the same sample; first order only (Concrete subspace learning, arXiv 2312.06173, as FusionBench runs it).
        inner = torch.optim.Adam([merger.weights], lr=s.inner_lr, betas=(0.9, 0.999))
        outer = torch.optim.Adam([merger.logit_flat], lr=s.lr, betas=(0.9, 0.999))
        total = s.steps + s.stage2_steps
        for step in range(1, s.steps + 1):
            merger.reset_coefficients()
            sample = merger.sample(noise)
            detached = MaskSample({n: v.detach() for n, v in sample.values.items()})
            loss_w = _loss(merger.merged(detached), forward, batches, s.objective, s.autocast)
            _check(loss_w, step, s.objective)
            inner.zero_grad(set_to_none=True)
            loss_w.backward()
            inner.step()
            loss_m = _loss(merger.merged(sample), forward, batches, s.objective, s.autocast)
            value = _check(loss_m, step, s.objective)
            outer.zero_grad(set_to_none=True)
            merger.weights.grad = None
            loss_m.backward()
            outer.step()
            tick(step, total, value, stage=1)
        # Stage 2: freeze one mask draw; AdaMerging inside it from the initial coefficients.
        mask_bits = merger.draw_bits(noise)
        final_mask = rescale(mask_bits)
        merger.reset_coefficients()
        opt = torch.optim.Adam([merger.weights], lr=s.lr, betas=(0.9, 0.999))
        for step in range(s.steps + 1, total + 1):
            loss = _loss(merger.merged(final_mask), forward, batches, s.objective, s.autocast)
            value = _check(loss, step, s.objective)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tick(step, total, value, stage=2)
    else:
        raise ZooError(f"unknown learned merge {s.method!r}")
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        merged = {n: t.detach().float().cpu() for n, t in merger.merged(final_mask).items()}
    for n, t in merged.items():
        if not torch.isfinite(t).all():
            raise ZooError(f"the merged tensor {n} has NaN or infinite values; nothing was written")
    return Result(merged, merger.coefficients_list(), mask_bits and {n: b.cpu() for n, b in mask_bits.items()},
                  {n: x.cpu() for n, x in merger.logits_dict().items()} if mask_bits else None,
                  history, seconds, done)


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
    return scaled, temps


def settings_from(options: dict[str, Any], method: str, seed: int) -> Settings:
    """Settings from a recipe's resolved global parameters."""
    keys = Settings.__dataclass_fields__
    return Settings(method=method, seed=seed, **{k: v for k, v in options.items() if k in keys and k != "method"})
