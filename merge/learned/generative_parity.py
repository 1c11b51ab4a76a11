"""Parity distillation for generative experts (causal LMs), after MPA (Model Parity
Aligner, arXiv 2509.16633, EMNLP 2025): the seed paper's own setting, a teacher's
generated answers teaching a student without labels, adapted to levelling a merge
against its experts.

Per round, as for classifiers (``merge.learned.parity``):
1. **Pseudo-annotate** (once per run): expert t answers its task's pool greedily; the
   answer's mean token confidence, whether it ended, a second, sampled decode at
   ``sample_temp`` (seeded), and the expert's token distributions on its own answer
   (teacher-forced) are kept. The decodes, the costly part, can be kept across runs
   (``DecodeCache``; ``merge.teacher_answers`` stores them as lineage artifacts of the
   expert): a later run with the same prompts and decode settings reads them back and
   draws what a fresh run draws.
2. **Identify** the parity set: prompts where the expert is reliable (the answer ended,
   its confidence ≥ τ, and the sampled decode gives the same answer) and the merge's
   greedy answer differs (``zoo.textgen.same_answer``).
3. **Level**: token-level cross-entropy on the expert's answer (teacher-forced, the
   prompt masked), plus kl_weight·T²·KL(expert ‖ merge) at T over the answer positions,
   on the parity set; plus agree_weight·KL(expert ‖ merge) over the answer positions of
   reliable prompts where the two agree, so they do not regress (also for a task whose
   parity set is empty that round: with a whole answer at stake, a task left out of the
   loss for a round loses agreement quickly).

Why a sampled decode and not a perturbed prompt as the second view: for short checkable
answers (sort, reverse, count) any edit of the prompt changes the right answer, so a
changed answer would say nothing about the expert. A sample at temperature 1 repeats
the greedy answer with probability ∏ p(token), the whole answer's probability, which
catches answers that a high mean token confidence hides (one unsure token among sure
ones).

What trains is what classifier parity trains (coefficients, mask logits, parameter
offsets), through the same ``Student``; ``keep: best`` picks the round with the least
average disagreement with the experts on their reliable prompts (label-free).
"""

from __future__ import annotations

import hashlib
import time
import json
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from zoo.checkpoints.prompts import Prompt
from zoo.errors import ZooError
from zoo.textgen import TextCodec, generate, same_answer, scored, teacher_forced

from zoo.merge.learned.distributed import current
from zoo.merge.learned.merger import Merger
from zoo.merge.learned.parity import (CHUNK, Cycle, Log, ParitySettings, Selection, Student, TeacherFactory,
                                      level)
from zoo.merge.learned.train import Forward, Report, Result, forward_all

GENERATIVE_VIEWS = ("auto", "sample", "none")  # auto: sample
DECODES_VERSION = 2  # bump when what decides an expert's decodes changes, so old ones are not reused


@dataclass
class GenTask:
    """One generative task as parity sees it: its pool's prompts as token ids, and the
    labelled records measured each round (never trained on)."""

    name: str
    prompts: list[list[int]]
    eval_prompts: list[list[int]] | None = None
    eval_answers: list[str] | None = None

    def __len__(self) -> int:
        return len(self.prompts)


def gen_tasks(names: Sequence[str], pools: Sequence[Sequence[Prompt]], codec: TextCodec,
              evals: Sequence[Sequence[Prompt] | None] | None = None) -> list[GenTask]:
    """Tasks from prompt records: the pool's prompts (its answers are ignored: label-free),
    and the eval records that have an answer."""
    out = []
    for i, (name, pool) in enumerate(zip(names, pools)):
        ev = [p for p in (evals[i] or []) if p.answer is not None] if evals else []
        out.append(GenTask(name, [codec.prompt_ids(p) for p in pool],
                           [codec.prompt_ids(p) for p in ev] or None, [str(p.answer) for p in ev] or None))
    return out


# -- 1. pseudo-annotation ---------------------------------------------------------------------
@dataclass
class Decodes:
    """An expert's decodes of its pool, what annotation keeps of them besides the token
    distributions: the greedy answers (tokens, without the end token), whether each
    ended, its mean token confidence, the sampled second view's answers, and the
    sampling generator's state after them (restored when they are reused, so the run
    draws its batches as one that decodes anew)."""

    greedy: list[tuple[int, ...]]
    ended: torch.Tensor  # bool [n]
    confidence: torch.Tensor  # float32 [n]
    view: list[tuple[int, ...]] | None
    state: torch.Tensor | None  # torch.Generator.get_state() after the sampled view; None without one


class DecodeCache(Protocol):
    """Where task t's expert's decodes are kept between runs, under ``key``
    (``decodes_key``): ``get`` returns None where there are none."""

    def get(self, t: int, key: str) -> Decodes | None: ...

    def put(self, t: int, key: str, decodes: Decodes) -> None: ...


@dataclass
class GenAnnotation:
    """One task's pool as its expert answered it: computed once, reused every round."""

    answers: list[tuple[int, ...]]  # greedy answer tokens, without the end token
    texts: list[str]  # the same, decoded
    ended: torch.Tensor  # bool [n]: the answer ended (an end token within the limits)
    confidence: torch.Tensor  # [n]: mean probability of the chosen tokens
    view_answers: list[tuple[int, ...]] | None  # the sampled decode's answer tokens (None: no second view)
    view_texts: list[str] | None  # the same, decoded
    teacher: list[torch.Tensor] | None  # per prompt: log-probabilities [answer tokens + 1, vocabulary]
    reused: bool = False  # the decodes came from a ``DecodeCache``
    seconds: float = 0.0  # what annotating took (decodes, or reading them back, and distributions)

    def digest(self) -> str:
        """A fingerprint of the answers and confidences (rounded): two teachers that answer
        alike have the same one."""
        blob = "\n".join(f"{t!r}\t{int(e)}\t{c:.4f}" for t, e, c in
                         zip(self.texts, self.ended.tolist(), self.confidence.tolist()))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def decodes(self, state: torch.Tensor | None) -> Decodes:
        return Decodes(self.answers, self.ended, self.confidence, self.view_answers, state)


def decodes_key(prompts: list[list[int]], codec: TextCodec, s: ParitySettings, generator: torch.Generator,
                device) -> str:
    """What decides an expert's decodes of these prompts besides the expert: the prompts'
    tokens, the end token and context, the decode settings and batching, the device
    (its kind, and a GPU's model) and the torch and transformers versions, and for a
    sampled view the generator's state before it. (Decoding runs in float32, never
    under autocast.)"""
    import transformers

    view = _view(s)
    device = torch.device(device)
    blob = {"v": DECODES_VERSION, "prompts": hashlib.sha256(json.dumps(prompts).encode()).hexdigest(),
            "eos": codec.eos_id, "context": codec.context, "max_new_tokens": s.max_new_tokens, "view": view,
            "chunk": CHUNK, "device": device.type, "torch": torch.__version__,
            "transformers": transformers.__version__}
    if device.type == "cuda":
        blob["gpu"] = torch.cuda.get_device_name(device)
    if view == "sample":
        blob["sample_temp"] = s.sample_temp
        blob["state"] = hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()


@torch.no_grad()
def annotate(teacher, prompts: list[list[int]], codec: TextCodec, s: ParitySettings, generator: torch.Generator,
             device, keep_distributions: bool, decodes: Decodes | None = None) -> GenAnnotation:
    """The expert's greedy answers on its pool, a sampled second decode, and (when a KL
    term needs them) its token distributions on its own answers. With ``decodes`` (kept
    from an earlier run) nothing is decoded and the generator takes their state;
    ``teacher`` is then only run for the distributions (and may be None without them)."""
    view = _view(s) == "sample"
    if decodes is not None:
        if decodes.state is not None:
            generator.set_state(decodes.state)
        answers, ended, confidence, view_answers = (decodes.greedy, decodes.ended, decodes.confidence,
                                                    decodes.view if view else None)
    else:
        greedy = generate(teacher, prompts, codec.eos_id, s.max_new_tokens, batch_size=CHUNK, context=codec.context,
                          device=device)
        answers = [g.tokens for g in greedy]
        ended = torch.tensor([g.ended for g in greedy])
        confidence = torch.tensor([g.confidence for g in greedy], dtype=torch.float32)
        view_answers = None
        if view:
            sampled = generate(teacher, prompts, codec.eos_id, s.max_new_tokens, temperature=s.sample_temp,
                               generator=generator, batch_size=CHUNK, context=codec.context, device=device)
            view_answers = [g.tokens for g in sampled]
    dists = _distributions(teacher, prompts, answers, codec, device) if keep_distributions else None
    return GenAnnotation(answers, [codec.decode(a) for a in answers], ended, confidence, view_answers,
                         [codec.decode(a) for a in view_answers] if view_answers is not None else None, dists,
                         reused=decodes is not None)


def _view(s: ParitySettings) -> str:
    if s.view not in GENERATIVE_VIEWS:
        raise ZooError(f"view {s.view} does not apply to generated answers; set view to sample (a second, "
                       "sampled decode) or none")
    return "sample" if s.view == "auto" else s.view


def _distributions(teacher, prompts: list[list[int]], answers: list[tuple[int, ...]], codec: TextCodec,
                   device) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    for i in range(0, len(prompts), CHUNK):
        p, a = prompts[i:i + CHUNK], [list(x) + [codec.eos_id] for x in answers[i:i + CHUNK]]
        batch = {k: v.to(device) for k, v in teacher_forced(p, a, codec.pad_id).items()}
        logits, _, rows = scored(teacher({k: v for k, v in batch.items() if k != "labels"}), batch["labels"])
        lp = logits.float().log_softmax(-1)
        out += list(lp.split(torch.bincount(rows, minlength=len(p)).tolist()))
    return out


# -- 2. the parity set ---------------------------------------------------------------------------
def generative_rule(confidence: torch.Tensor, ended: torch.Tensor, answers: Sequence[str],
                    view_answers: Sequence[str] | None, student_answers: Sequence[str], tau: float) -> Selection:
    """MPA's selection rule for generated answers: reliable = the expert's answer ended,
    its mean token confidence ≥ τ and the second view gives the same answer (when there
    is one); parity = reliable and the merge's greedy answer differs. Unreliable prompts
    are dropped whether or not the merge agrees."""
    reliable = ended.bool() & (confidence >= tau)
    if view_answers is not None:
        reliable = reliable & torch.tensor([same_answer(a, b) for a, b in zip(answers, view_answers)],
                                           dtype=torch.bool)
    agree = torch.tensor([same_answer(a, b) for a, b in zip(answers, student_answers)], dtype=torch.bool)
    return Selection(reliable, agree)


# -- 3. levelling --------------------------------------------------------------------------------
def generative_loss(student: torch.Tensor, target: torch.Tensor, rows: torch.Tensor, n_parity: int,
                    teacher: torch.Tensor | None, s: ParitySettings,
                    shares: tuple[float, float] = (1.0, 1.0)) -> torch.Tensor:
    """On the scored answer positions of a batch whose first ``n_parity`` rows are parity
    prompts and the rest agreeing ones (``student``: the merge's logits [N, vocabulary],
    ``target``: the expert's tokens, ``rows``: each position's row, ``teacher``: the
    expert's log-probabilities there): token-level CE on the parity rows (+ kl_weight·T²·
    KL(expert ‖ merge) at T), + agree_weight·KL(expert ‖ merge) on the agreeing rows;
    each term a mean over its answer positions. ``shares`` weigh the two means: across
    processes, this process's fraction of the step's parity positions and of its
    agreeing positions."""
    student = student.float()
    par = rows < n_parity
    loss = F.cross_entropy(student[par], target[par]) if n_parity else student.new_zeros(())
    if s.kl_weight > 0 and n_parity:
        assert teacher is not None
        t = s.kl_temperature
        loss = loss + s.kl_weight * t * t * _kl(teacher[par] / t, student[par] / t)
    if shares[0] != 1.0:
        loss = loss * shares[0]
    agree = ~par
    if s.agree_weight > 0 and bool(agree.any()):
        assert teacher is not None
        loss = loss + shares[1] * s.agree_weight * _kl(teacher[agree], student[agree])
    return loss


def _kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student), a mean over positions (rows)."""
    return F.kl_div(student.log_softmax(dim=-1), teacher.log_softmax(dim=-1), log_target=True,
                    reduction="batchmean")


def distill_generative(merger: Merger, forward: Forward, teachers: list[TeacherFactory], tasks: list[GenTask],
                       codec: TextCodec, s: ParitySettings, *, start_bits: dict[str, torch.Tensor] | None = None,
                       start_offsets: dict[str, torch.Tensor] | None = None, report: Report | None = None,
                       log: Log | None = None, cache: DecodeCache | None = None) -> tuple[Result, list[GenAnnotation]]:
    """Level the merge ``merger`` describes against its generative experts, round by round.

    ``forward(t, params, batch)`` runs the merged causal LM (logits [batch, positions,
    vocabulary]); ``teachers[t]()`` builds task t's expert, which answers its pool once.
    Returns the result (its ``rounds`` table: per round and task the pool, reliable and
    parity counts, the disagreement on reliable prompts and on the whole pool, and exact
    match on the eval records) and each task's annotation. ``cache`` keeps each
    expert's decodes between runs."""
    if len(teachers) != len(tasks) or len(tasks) != merger.n_tasks:
        raise ZooError(f"{merger.n_tasks} experts, {len(teachers)} teachers and prompts for {len(tasks)} tasks")
    for task in tasks:
        if not task.prompts:
            raise ZooError(f"task {task.name!r} has no unlabeled prompts to distil on")
    _view(s)
    device = merger.base_flat.device
    log = log or (lambda m: None)
    report = report or (lambda *a: None)
    gen = torch.Generator().manual_seed(s.seed)  # sampled decodes and batches
    noise = torch.Generator(device=device).manual_seed(s.seed)  # mask draws
    torch.manual_seed(s.seed)
    t0 = time.perf_counter()

    need = s.kl_weight > 0 or s.agree_weight > 0
    annotations = []
    for t, task in enumerate(tasks):
        started = time.perf_counter()
        key = decodes_key(task.prompts, codec, s, gen, device) if cache is not None else ""
        kept = cache.get(t, key) if cache is not None else None
        teacher = teachers[t]() if kept is None or need else None
        annotations.append(annotate(teacher, task.prompts, codec, s, gen, device, need, decodes=kept))
        if cache is not None and kept is None:
            cache.put(t, key, annotations[-1].decodes(gen.get_state() if _view(s) == "sample" else None))
        annotations[-1].seconds = time.perf_counter() - started
        if kept is not None:
            log(f"task {task.name!r}: its expert's answers to the {len(task)} pool prompts read back, not decoded")

    result = level(merger, s, start_bits, start_offsets, [task.name for task in tasks],
                   identify=lambda student: _identify(student, forward, annotations, tasks, codec, s, device),
                   measure=lambda r, student, selections: _rows(r, tasks, selections, student, forward, codec, s,
                                                                device),
                   step=lambda student, cycles, opt: _step(student, forward, annotations, tasks, cycles, codec, s,
                                                           opt, noise, device),
                   keep_agreeing=True, gen=gen, noise=noise, report=report, log=log, t0=t0)
    return result, annotations


def _step(student: Student, forward: Forward, annotations: list[GenAnnotation], tasks: list[GenTask],
          cycles: dict[int, tuple[Cycle, Cycle]], codec: TextCodec, s: ParitySettings, opt: torch.optim.Optimizer,
          noise: torch.Generator, device) -> torch.Tensor:
    """One Adam step on every active task's parity batch (and agreeing batch). All the
    batches are right-padded to one length, so the body runs once over all of them (a
    causal LM's real tokens never attend to the padding after them)."""
    params = student.params(student.merger.sample(noise) if "mask" in s.train else None)
    sync = current()  # across processes: every one draws the same rows and takes its share
    picked = []
    for t, (parity, agreeing) in cycles.items():
        par = parity.next()
        agree = agreeing.next() if s.agree_weight > 0 else par[:0]
        mine_p, mine_a = par[sync.share(len(par), empty=True)], agree[sync.share(len(agree), empty=True)]
        if len(mine_p) + len(mine_a) == 0:
            continue
        a = annotations[t]

        def positions(rows: torch.Tensor, a: GenAnnotation = a) -> int:  # scored: the answer and its end
            return sum(len(a.answers[i]) + 1 for i in rows.tolist())
        shares = (sync.fraction(positions(mine_p), positions(par)), sync.fraction(positions(mine_a), positions(agree)))
        idx = torch.cat([mine_p, mine_a]).tolist()
        picked.append((t, idx, len(mine_p), [tasks[t].prompts[i] for i in idx],
                       [list(a.answers[i]) + [codec.eos_id] for i in idx], shares))
    if not picked:  # this process's share of this step is empty: the others' gradients still count
        opt.zero_grad(set_to_none=True)
        loss = sync.reduce(opt, None)
        opt.step()
        return loss
    length = max(len(p) + len(x) for _, _, _, ps, xs, _ in picked for p, x in zip(ps, xs))
    batches = [{k: v.to(device) for k, v in teacher_forced(ps, xs, codec.pad_id, length).items()}
               for _, _, _, ps, xs, _ in picked]
    with torch.autocast("cuda", dtype=torch.bfloat16) if s.autocast else nullcontext():
        logits = forward_all(forward, params, [{k: v for k, v in b.items() if k != "labels"} for b in batches],
                             [t for t, *_ in picked])
    loss = None
    for (t, idx, n_parity, _, _, shares), out, batch in zip(picked, logits, batches):
        pred, target, rows = scored(out, batch["labels"])
        teacher = annotations[t].teacher
        dist = torch.cat([teacher[i] for i in idx]) if teacher is not None else None
        term = generative_loss(pred, target, rows, n_parity, dist, s, shares)
        loss = term if loss is None else loss + term
    assert loss is not None
    opt.zero_grad(set_to_none=True)
    loss.backward()
    loss = sync.reduce(opt, loss)
    opt.step()
    return loss.detach()


@torch.no_grad()
def answers_of(student: Student, forward: Forward, t: int, prompts: list[list[int]], codec: TextCodec,
               s: ParitySettings, device) -> list[str]:
    """The current merge's greedy answers to ``prompts`` (task t's forward)."""
    params = student.params()
    gens = generate(lambda b: forward(t, params, b), prompts, codec.eos_id, s.max_new_tokens, batch_size=CHUNK,
                    context=codec.context, device=device)
    return [codec.decode(g.tokens) for g in gens]


def _identify(student: Student, forward: Forward, annotations: list[GenAnnotation], tasks: list[GenTask],
              codec: TextCodec, s: ParitySettings, device) -> list[Selection]:
    out = []
    for t, (a, task) in enumerate(zip(annotations, tasks)):
        mine = answers_of(student, forward, t, task.prompts, codec, s, device)
        out.append(generative_rule(a.confidence, a.ended, a.texts, a.view_texts, mine, s.tau))
    return out


def _rows(r: int, tasks: list[GenTask], selections: list[Selection], student: Student, forward: Forward,
          codec: TextCodec, s: ParitySettings, device) -> list[dict]:
    rows = []
    for t, (task, sel) in enumerate(zip(tasks, selections)):
        em = None
        if task.eval_prompts and task.eval_answers:
            mine = answers_of(student, forward, t, task.eval_prompts, codec, s, device)
            em = sum(same_answer(a, b) for a, b in zip(mine, task.eval_answers)) / len(mine)
        reliable = int(sel.reliable.sum())
        rows.append({"round": r, "task": task.name, "pool": len(task), "reliable": reliable,
                     "parity": int(sel.parity.sum()),
                     "disagreement": int(sel.parity.sum()) / reliable if reliable else 0.0,
                     "pool_disagreement": float((~sel.agree).float().mean()), "exact_match": em,
                     "accuracy": None})  # a classifier's column, so the same table prints
    return rows


__all__ = ["GENERATIVE_VIEWS", "DecodeCache", "Decodes", "GenAnnotation", "GenTask", "annotate", "decodes_key", "answers_of", "distill_generative",
           "gen_tasks", "generative_loss", "generative_rule"]
