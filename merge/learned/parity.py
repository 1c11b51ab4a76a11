"""Parity distillation, after MPA (*Model Parity Aligner*): the experts teach the merged
model without labels, only where they are reliable and the merged model disagrees
(Model Parity Aligner, arXiv 2509.16633, EMNLP 2025).

Per round:
1. **Pseudo-annotate** (once, cached): expert t labels its own task's unlabeled pool,
   on the input and on a second weak view of it.
2. **Identify** the parity set: samples where the expert is reliable (confidence ≥ τ
   and the same label on the second view) and the current merged model disagrees.
3. **Level**: train on the parity set only (cross-entropy to the expert's label, plus
   an optional temperature-scaled KL to the expert), with a small KL weight on the
   agreeing reliable samples so they do not regress.

What trains is the merge itself: its coefficients, its shared Concrete mask logits, or
a small named subset of parameters, so the result stays a plain merged checkpoint.
Everything here works on tensors and callables; ``merge.learning`` builds them
from checkpoints.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from zoo.errors import ZooError

from zoo.merge.learned.distributed import current
from zoo.merge.learned.merger import Mask, MaskSample, Merger, rescale
from zoo.merge.learned.train import LOG_EVERY, Forward, Report, Result, TaskData, forward_all

# teacher(batch of inputs) -> logits; each task has its own (its expert, or a named teacher)
Teacher = Callable[[dict[str, torch.Tensor]], torch.Tensor]
# a teacher is built when its pool is labelled and dropped after, so one lives at a time
TeacherFactory = Callable[[], Teacher]
# log(message): a line per notable event (an empty parity set, an early stop)
Log = Callable[[str], None]

TRAINABLE = ("coefficients", "mask", "params")
VIEWS = ("auto", "shift", "noise", "drop", "none", "sample")  # sample: generated answers only
CHUNK = 256  # examples per forward when labelling or measuring a whole pool


@dataclass
class ParitySettings:
    """A distillation's settings, every one resolved: ``Parity.settings`` fills them from
    the parity method's parameter table (its one set of defaults) and the recipe."""

    tau: float  # reliability: the expert's confidence at least this
    view: str  # the second weak view: shift | noise | drop | none | auto
    view_strength: float  # noise: std as a fraction of the input's; drop: token fraction
    rounds: int
    steps: int  # optimisation steps per round
    keep: str  # best: the round with the least disagreement on the pools (label-free); last
    lr: float
    batch_size: int  # parity samples per task per step (and as many agreeing ones)
    train: tuple[str, ...]  # of TRAINABLE
    params: str  # train includes params: which tensors get a trained offset
    kl_weight: float  # T²·KL(expert ‖ merged) at kl_temperature, on parity samples
    kl_temperature: float
    agree_weight: float  # KL(expert ‖ merged) on reliable samples that agree
    temperature: float  # Concrete mask temperature (train includes mask)
    seed: int = 0
    autocast: bool = False  # bf16 forward (CUDA)
    pad_id: int = 0  # the token a dropped token becomes (view drop)
    max_new_tokens: int = 32  # generative tasks: the longest answer a teacher or the merge gives
    sample_temp: float = 1.0  # generative view sample: the second decode's temperature

    def __post_init__(self) -> None:
        if not 0 < self.tau <= 1:
            raise ZooError(f"tau must be in (0, 1], not {self.tau}: it is the confidence an expert needs "
                           "for its label to count")
        unknown = [x for x in self.train if x not in TRAINABLE]
        if unknown or not self.train:
            raise ZooError(f"train must name one or more of {', '.join(TRAINABLE)}, not {','.join(self.train)!r}")
        if self.keep not in ("best", "last"):
            raise ZooError(f"keep must be best or last, not {self.keep!r}")
        if self.view not in VIEWS:
            raise ZooError(f"view must be one of {', '.join(VIEWS)}, not {self.view!r}")


# -- 1. pseudo-annotation ---------------------------------------------------------------------
def weak_view(inputs: dict[str, torch.Tensor], kind: str, strength: float, generator: torch.Generator,
              pad_id: int = 0) -> dict[str, torch.Tensor] | None:
    """A second, weakly changed view of a batch of inputs (None for ``none``).

    ``noise`` adds Gaussian noise of ``strength`` × the input's std to float inputs,
    ``shift`` moves each image by one pixel in a random direction (edges repeated),
    ``drop`` replaces a ``strength`` fraction of attended tokens (never the first) with
    ``pad_id``; ``auto`` picks noise for float inputs and drop for token ids. (A pixel
    is a large shift for small images: on the 8×8 demo digits it leaves only 20–70% of
    the rotated and flipped tasks' samples reliable, against 45–97% with noise.)
    """
    if kind == "none":
        return None
    out = dict(inputs)
    for k, x in inputs.items():
        if k in ("attention_mask", "token_type_ids"):
            continue
        how = kind
        if kind == "auto":
            how = "noise" if x.is_floating_point() else "drop"
        if how == "shift" and x.is_floating_point() and x.dim() == 4:
            out[k] = _shift(x, generator)
        elif how == "noise" and x.is_floating_point():
            noise = torch.randn(x.shape, generator=generator).to(x.device, x.dtype)
            out[k] = x + strength * x.float().std().to(x.dtype) * noise
        elif how == "drop" and not x.is_floating_point() and x.dim() == 2:
            keep = inputs.get("attention_mask", torch.ones_like(x)).bool()
            hit = (torch.rand(x.shape, generator=generator).to(x.device) < strength) & keep
            hit[:, 0] = False
            out[k] = x.masked_fill(hit, pad_id)
        else:
            raise ZooError(f"view {how} does not apply to input {k!r} ({x.dtype}, {x.dim()}-D); "
                           "set view to one that does, or none")
    return out


def _shift(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by one pixel up, down, left or right, the edge row repeated."""
    direction = torch.randint(0, 4, (x.shape[0],), generator=generator).to(x.device)
    padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
    h, w = x.shape[-2:]
    offsets = [(0, 1), (2, 1), (1, 0), (1, 2)]  # (row, col) start in the padded image
    out = torch.empty_like(x)
    for d, (r, c) in enumerate(offsets):
        sel = direction == d
        out[sel] = padded[sel, :, r:r + h, c:c + w]
    return out


@dataclass
class Annotation:
    """One task's pool as its expert labelled it: computed once, reused every round."""

    logits: torch.Tensor  # [n, classes] on the inputs themselves
    view_pred: torch.Tensor | None  # the expert's label on the second view

    @property
    def pred(self) -> torch.Tensor:
        return self.logits.argmax(dim=-1)

    @property
    def confidence(self) -> torch.Tensor:
        return self.logits.softmax(dim=-1).max(dim=-1).values


def _chunks(data: TaskData, device) -> list[dict[str, torch.Tensor]]:
    return [{k: v[i:i + CHUNK].to(device) for k, v in data.inputs.items()} for i in range(0, len(data), CHUNK)]


@torch.no_grad()
def annotate(teacher: Teacher, data: TaskData, s: ParitySettings, generator: torch.Generator,
             device) -> Annotation:
    """The expert's logits on its pool and its labels on a second view."""
    logits, view_pred = [], []
    for batch in _chunks(data, device):
        logits.append(teacher(batch).float())
        second = weak_view(batch, s.view, s.view_strength, generator, s.pad_id)
        if second is not None:
            view_pred.append(teacher(second).argmax(dim=-1))
    return Annotation(torch.cat(logits), torch.cat(view_pred) if view_pred else None)


# -- 2. the parity set ---------------------------------------------------------------------------
@dataclass
class Selection:
    """Which pool samples carry signal: the expert is reliable on them, and the merged
    model agrees with it or not."""

    reliable: torch.Tensor  # bool [n]
    agree: torch.Tensor  # bool [n]: merged argmax == expert argmax

    @property
    def parity(self) -> torch.Tensor:
        """Reliable and disagreeing: what the leveler trains on."""
        return self.reliable & ~self.agree

    @property
    def agreeing(self) -> torch.Tensor:
        """Reliable and agreeing: kept from regressing by the small KL term."""
        return self.reliable & self.agree


def parity_rule(confidence: torch.Tensor, pred: torch.Tensor, view_pred: torch.Tensor | None,
                student_pred: torch.Tensor, tau: float) -> Selection:
    """MPA's selection rule for classifiers (MPA, adapted): reliable = confidence ≥ τ and the
    same label on the second view (when there is one); parity = reliable and the merged
    model's label differs. Unreliable samples are dropped whether or not they agree."""
    reliable = confidence >= tau
    if view_pred is not None:
        reliable = reliable & (view_pred == pred)
    return Selection(reliable, student_pred == pred)


# -- 3. levelling --------------------------------------------------------------------------------
def parity_loss(student: torch.Tensor, teacher: torch.Tensor, n_parity: int, s: ParitySettings,
                shares: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """On a batch whose first ``n_parity`` rows are parity samples and the rest agreeing
    ones: CE to the expert's label (+ kl_weight·T²·KL at T) on the first, agree_weight·KL
    on the rest. KL is KL(expert ‖ merged). ``shares`` weigh the two means: across
    processes, this process's fraction of the parity rows and of the agreeing rows."""
    student, teacher = student.float(), teacher.float()
    sp, tp = student[:n_parity], teacher[:n_parity]
    if n_parity == 0:  # across processes, a share with agreeing rows only
        loss = student.new_zeros(())
    else:
        loss = F.cross_entropy(sp, tp.argmax(dim=-1))
    if s.kl_weight > 0 and n_parity:
        t = s.kl_temperature
        loss = loss + s.kl_weight * t * t * _kl(tp / t, sp / t)
    if shares[0] != 1.0:
        loss = loss * shares[0]
    if student.shape[0] > n_parity and s.agree_weight > 0:
        loss = loss + shares[1] * s.agree_weight * _kl(teacher[n_parity:], student[n_parity:])
    return loss


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    return F.kl_div(student.log_softmax(dim=-1), teacher.log_softmax(dim=-1), log_target=True,
                    reduction="batchmean")


class Cycle:
    """Shuffled, cycled batches of one index set, from a seeded generator."""

    def __init__(self, indices: torch.Tensor, size: int, generator: torch.Generator):
        self.indices, self.size, self.gen = indices, size, generator
        self.order, self.pos = indices[:0], 0

    def next(self) -> torch.Tensor:
        if len(self.indices) == 0:
            return self.indices
        out = []
        need = min(self.size, len(self.indices))
        while need:
            if self.pos >= len(self.order):
                self.order, self.pos = self.indices[torch.randperm(len(self.indices), generator=self.gen)], 0
            take = self.order[self.pos:self.pos + need]
            self.pos += len(take)
            need -= len(take)
            out.append(take)
        return torch.cat(out)


@dataclass
class Student:
    """The merged model being levelled: the merger (coefficients and mask) plus optional
    trained offsets on a named subset of parameters."""

    merger: Merger
    mask: MaskSample | None  # the mask the current model uses (None: unmasked)
    mask_bits: dict[str, torch.Tensor] | None
    offsets: dict[str, torch.Tensor] = field(default_factory=dict)

    def params(self, mask: Mask | None = None) -> dict[str, torch.Tensor]:
        merged = self.merger.merged(mask if mask is not None else self.mask)
        for n, d in self.offsets.items():
            merged[n] = merged[n] + d
        return merged

    def snapshot(self) -> "Snapshot":
        return Snapshot(self.merger.weights.detach().clone(), self.merger.logit_flat.detach().clone(),
                        {n: d.detach().clone() for n, d in self.offsets.items()}, self.mask_bits, self.mask)

    @torch.no_grad()
    def restore(self, snap: "Snapshot") -> None:
        self.merger.weights.copy_(snap.weights)
        self.merger.logit_flat.copy_(snap.logits)
        for n, d in snap.offsets.items():
            self.offsets[n].copy_(d)
        self.mask_bits, self.mask = snap.mask_bits, snap.mask


@dataclass
class Snapshot:
    """The student after a round: what ``keep`` may return to."""

    weights: torch.Tensor
    logits: torch.Tensor
    offsets: dict[str, torch.Tensor]
    mask_bits: dict[str, torch.Tensor] | None
    mask: MaskSample | None


def distill(merger: Merger, forward: Forward, teachers: list[TeacherFactory], data: list[TaskData],
            s: ParitySettings, *, start_bits: dict[str, torch.Tensor] | None = None,
            start_offsets: dict[str, torch.Tensor] | None = None, eval_data: list[TaskData | None] | None = None,
            report: Report | None = None, log: Log | None = None) -> Result:
    """Level the merge ``merger`` describes against its experts, round by round.

    ``forward(t, params, batch)`` runs the merged model with task t's head;
    ``teachers[t]()`` builds task t's expert, run once over its pool. ``start_bits``
    and ``start_offsets`` are the start's binary mask (a Concrete start) and parameter
    offsets (an earlier parity run). ``eval_data[t]``, when labelled, gives each round
    an accuracy; it is only measured, never trained on.
    """
    if len(teachers) != len(data) or len(data) != merger.n_tasks:
        raise ZooError(f"{merger.n_tasks} experts, {len(teachers)} teachers and data for {len(data)} tasks")
    for d in data:
        if len(d.inputs) == 0 or len(d) == 0:
            raise ZooError(f"task {d.name!r} has no unlabeled pool to distil on")
    device = merger.base_flat.device
    log = log or (lambda m: None)
    report = report or (lambda *a: None)
    gen = torch.Generator().manual_seed(s.seed)  # views and batches
    noise = torch.Generator(device=device).manual_seed(s.seed)  # mask draws
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()

    annotations = [annotate(teachers[t](), d, s, gen, device) for t, d in enumerate(data)]
    _check_labels(merger, forward, annotations, data, device)

    return level(merger, s, start_bits, start_offsets, [d.name for d in data],
                 identify=lambda student: _identify(student, forward, annotations, data, s, device),
                 measure=lambda r, student, selections: _rows(r, data, selections, annotations, student, forward,
                                                              eval_data, device),
                 step=lambda student, cycles, opt: _step(student, forward, annotations, data, cycles, s, opt, noise,
                                                         device),
                 keep_agreeing=False, gen=gen, noise=noise, report=report, log=log, t0=t0)


# What a round of ``level`` calls: identify(student) -> each task's Selection;
# measure(round, student, selections) -> the table's rows; step(student, cycles, optimiser) -> the loss.
Identify = Callable[["Student"], "list[Selection]"]
Measure = Callable[[int, "Student", "list[Selection]"], list[dict]]
Step = Callable[["Student", "dict[int, tuple[Cycle, Cycle]]", torch.optim.Optimizer], torch.Tensor]


def level(merger: Merger, s: ParitySettings, start_bits: dict[str, torch.Tensor] | None,
          start_offsets: dict[str, torch.Tensor] | None, names: list[str], *, identify: Identify, measure: Measure,
          step: Step, keep_agreeing: bool, gen: torch.Generator, noise: torch.Generator, report: Report, log: Log,
          t0: float) -> Result:
    """The rounds every parity distillation runs, classifier or generative: per round,
    identify the parity sets and measure (round 0 is the start), keep the best round so
    far by the average disagreement (label-free), then ``s.steps`` steps over each
    task's parity and agreeing rows. A task with an empty parity set is skipped, or with
    ``keep_agreeing`` still trained on its agreeing rows so they do not regress. Stops
    early when no task has a parity set left; returns the kept round's model."""
    device = merger.base_flat.device
    student = Student(merger, rescale({n: b.to(device) for n, b in start_bits.items()}) if start_bits else None,
                      start_bits, {n: x.to(device, torch.float32) for n, x in (start_offsets or {}).items()})
    opt = torch.optim.Adam(trainable(student, s, device), lr=s.lr, betas=(0.9, 0.999))
    unit = "prompts" if keep_agreeing else "samples"
    table: list[dict] = []
    history: list[dict[str, float]] = []
    done, total = 0, s.rounds * s.steps
    best: tuple[float, int, Snapshot] | None = None
    for r in range(s.rounds + 1):
        selections = identify(student)
        rows = measure(r, student, selections)
        table += rows
        disagreement = sum(x["disagreement"] for x in rows) / len(rows)
        if s.keep == "last" or best is None or disagreement < best[0]:
            best = (disagreement, r, student.snapshot())
        if r == s.rounds:
            break
        active = [t for t, sel in enumerate(selections) if bool(sel.parity.any())]
        for t, sel in enumerate(selections):
            if t not in active:
                log(f"round {r + 1}: task {names[t]!r} has an empty parity set "
                    f"({int(sel.reliable.sum())} reliable {unit}, all agreeing); "
                    f"{'only kept from regressing' if keep_agreeing else 'skipped'}")
        if not active:
            log(f"round {r + 1}: no task has a parity set left; stopping after {r} round(s)")
            break
        kept = [t for t, sel in enumerate(selections)
                if t in active or (keep_agreeing and s.agree_weight > 0 and bool(sel.agreeing.any()))]
        cycles = {t: (Cycle(selections[t].parity.nonzero().squeeze(1).cpu(), s.batch_size, gen),
                      Cycle(selections[t].agreeing.nonzero().squeeze(1).cpu(), s.batch_size, gen)) for t in kept}
        done = run_round(lambda: step(student, cycles, opt), s.steps, r, done, total, history, report, t0)
        if "mask" in s.train:  # the current model: one binary draw of the learned mask
            student.mask_bits = merger.draw_bits(noise)
            student.mask = rescale(student.mask_bits)
    return finish(student, best, table, history, t0, done)


def run_round(step: Callable[[], torch.Tensor], steps: int, r: int, done: int, total: int,
              history: list[dict[str, float]], report: Report, t0: float) -> int:
    """Round ``r``'s optimisation steps; the losses are read back from the device every
    ``LOG_EVERY`` steps (not each step), checked and logged. Returns the steps done."""
    pending: list[torch.Tensor] = []  # losses not yet read back from the device
    for i_step in range(steps):
        pending.append(step())
        done += 1
        if i_step == 0 or (i_step + 1) % LOG_EVERY == 0 or i_step + 1 == steps:
            first = i_step + 1 - len(pending)
            for i, value in enumerate(torch.stack(pending).tolist()):
                if not math.isfinite(value):
                    raise ZooError(f"the parity loss became {value} at round {r + 1}, step {first + i + 1}; "
                                   "nothing was written. Try a lower lr")
                history.append({"round": r + 1, "step": done - len(pending) + i + 1, "loss": value})
            pending = []
            report(done, total, history[-1]["loss"], done / max(time.perf_counter() - t0, 1e-9))
    return done


def finish(student: Student, best: "tuple[float, int, Snapshot] | None", table: list[dict],
           history: list[dict[str, float]], t0: float, done: int) -> Result:
    """The kept round's model as the result (refused if any tensor is not finite)."""
    assert best is not None
    merger = student.merger
    student.restore(best[2])
    for row in table:
        row["kept"] = row["round"] == best[1]
    with torch.no_grad():
        merged = {n: t.detach().float().cpu() for n, t in student.params().items()}
    for n, t in merged.items():
        if not torch.isfinite(t).all():
            raise ZooError(f"the merged tensor {n} has NaN or infinite values; nothing was written")
    return Result(merged, merger.coefficients_list(),
                  {n: b.cpu() for n, b in student.mask_bits.items()} if student.mask_bits else None,
                  {n: x.cpu() for n, x in merger.logits_dict().items()} if student.mask_bits else None,
                  history, time.perf_counter() - t0, done, table,
                  {n: d.detach().cpu() for n, d in student.offsets.items()})


def trainable(student: Student, s: ParitySettings, device) -> list[torch.Tensor]:
    """What ``s.train`` names, switched to requires_grad (and the rest off)."""
    merger = student.merger
    out: list[torch.Tensor] = []
    if "coefficients" in s.train:
        if not isinstance(merger.weights, torch.nn.Parameter):
            raise ZooError("these coefficients are fixed; train mask or params instead")
        out.append(merger.weights)
    if "mask" in s.train:
        if not merger.mask_names:
            raise ZooError("train: mask needs a merge with a mask (set mask: REGEX)")
        out.append(merger.logit_flat)
    if "params" in s.train:
        pattern = re.compile(s.params)
        names = [n for n in merger.names if pattern.search(n)]
        if not names:
            raise ZooError(f"params pattern {s.params!r} matches none of the merged tensors "
                           f"(e.g. {', '.join(merger.names[:3])})")
        for n in names:  # from the start's offsets (an earlier parity merge), else zeros
            start = student.offsets.get(n)
            student.offsets[n] = (start.clone() if start is not None else
                                  torch.zeros(merger.shapes[merger.names.index(n)], device=device)).requires_grad_(True)
        out += [student.offsets[n] for n in names]
    if isinstance(merger.weights, torch.nn.Parameter):  # no gradient work for what does not train
        merger.weights.requires_grad_("coefficients" in s.train)
    merger.logit_flat.requires_grad_("mask" in s.train)
    return out


def _step(student: Student, forward: Forward, annotations: list[Annotation], data: list[TaskData],
          cycles: dict[int, tuple[Cycle, Cycle]], s: ParitySettings, opt: torch.optim.Optimizer,
          noise: torch.Generator, device) -> torch.Tensor:
    """One Adam step on every active task's parity batch (and agreeing batch), the body
    run once over all of them; the loss, left on the device (a step with a loss that is
    not finite moves the merge too, but the caller stops at the next read-back)."""
    params = student.params(student.merger.sample(noise) if "mask" in s.train else None)
    sync = current()  # across processes: every one draws the same rows and takes its share
    tasks, batches, picked = [], [], []
    for t, (parity, agreeing) in cycles.items():
        par = parity.next()
        agree = agreeing.next() if s.agree_weight > 0 else par[:0]
        mine_p, mine_a = par[sync.share(len(par), empty=True)], agree[sync.share(len(agree), empty=True)]
        if len(mine_p) + len(mine_a) == 0:
            continue
        idx = torch.cat([mine_p, mine_a])
        tasks.append(t)
        batches.append({k: v[idx].to(device) for k, v in data[t].inputs.items()})
        picked.append((idx, len(mine_p), (sync.fraction(len(mine_p), len(par)),
                                          sync.fraction(len(mine_a), len(agree)))))
    if not tasks:  # this process's share of this step is empty: the others' gradients still count
        opt.zero_grad(set_to_none=True)
        loss = sync.reduce(opt, None)
        opt.step()
        return loss
    with torch.autocast("cuda", dtype=torch.bfloat16) if s.autocast else nullcontext():
        logits = forward_all(forward, params, batches, tasks)
    loss = None
    for t, out, (idx, n_parity, shares) in zip(tasks, logits, picked):
        term = parity_loss(out, annotations[t].logits[idx.to(device)], n_parity, s, shares)
        loss = term if loss is None else loss + term
    assert loss is not None
    opt.zero_grad(set_to_none=True)
    loss.backward()
    loss = sync.reduce(opt, loss)
    opt.step()
    return loss.detach()


@torch.no_grad()
def _predict(student: Student, forward: Forward, t: int, data: TaskData, device) -> torch.Tensor:
    params = student.params()
    return torch.cat([forward(t, params, b).argmax(dim=-1) for b in _chunks(data, device)])


def _identify(student: Student, forward: Forward, annotations: list[Annotation], data: list[TaskData],
              s: ParitySettings, device) -> list[Selection]:
    out = []
    for t, (a, d) in enumerate(zip(annotations, data)):
        pred = _predict(student, forward, t, d, device).to(a.logits.device)
        out.append(parity_rule(a.confidence, a.pred, a.view_pred, pred, s.tau))
    return out


def _rows(r: int, data: list[TaskData], selections: list[Selection], annotations: list[Annotation],
          student: Student, forward: Forward, eval_data: list[TaskData | None] | None, device) -> list[dict]:
    rows = []
    for t, (d, sel) in enumerate(zip(data, selections)):
        acc = None
        ev = eval_data[t] if eval_data else None
        if ev is not None and ev.labels is not None:
            acc = float((_predict(student, forward, t, ev, device).cpu() == ev.labels.cpu()).float().mean())
        rows.append({"round": r, "task": d.name, "pool": len(d), "reliable": int(sel.reliable.sum()),
                     "parity": int(sel.parity.sum()), "disagreement": float((~sel.agree).float().mean()),
                     "accuracy": acc})
    return rows


def _check_labels(merger: Merger, forward: Forward, annotations: list[Annotation], data: list[TaskData],
                  device) -> None:
    """The merged model's head for each task must predict the teacher's label set."""
    with torch.no_grad():
        params = merger.merged()
        for t, (a, d) in enumerate(zip(annotations, data)):
            one = {k: v[:1].to(device) for k, v in d.inputs.items()}
            classes = forward(t, params, one).shape[-1]
            if classes != a.logits.shape[-1]:
                raise ZooError(f"task {d.name!r}: its teacher predicts {a.logits.shape[-1]} labels but the merged "
                               f"model's head for it has {classes}; the teacher must share the head's label set")
