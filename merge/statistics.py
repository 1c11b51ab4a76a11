"""The per-expert statistics the data-aware merges weigh experts with: each expert is
run once over its own task's unlabeled pool, and what it saw is stored as a lineage
artifact of that expert, so a re-merge with the same settings needs neither the data
nor a model run.

- ``gram`` (RegMean, Jin et al., ICLR 2023, arXiv 2212.09849): for every ``nn.Linear``
  whose weight is merged, the per-token mean Gram matrix of its inputs,
  G = XᵀX / N_tokens, X being every token of every example (padding too), as a
  forward hook sees them; summed in float64, stored in float32.
- ``fisher`` (Matena & Raffel, NeurIPS 2022, arXiv 2111.09832): the label-free
  diagonal Fisher in FusionBench's batch approximation. Per batch the scalar
  Σ_examples Σ_c sqrt(p_c)·log p_c (p detached: the model's own predictive
  distribution, no labels) is differentiated once and its gradient squared; the
  squares are summed over batches and divided by the number of examples. Squaring a
  batch sum keeps cross terms between examples and classes, so this approximates the
  paper's exact per-example expectation Σ_c p_c (∂ log p_c)²; it is what FusionBench
  runs.

An artifact is one safetensors file per expert and statistic, keyed by the kind, the
settings (examples, batch size, split) and the sha256 of the task data
(``Settings.key``); its tensors are named as the checkpoint names the weights.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from types import SimpleNamespace
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from zoo.checkpoints.reader import Checkpoint, open_safetensors
from zoo.errors import NotFound, ZooError
from zoo.textgen import TextCodec, teacher_forced

from zoo.checkpoints.prompts import DEFAULT_SPLIT, FORMAT as PROMPTS_FORMAT
from zoo.merge.learned.data import from_path, from_registry, is_generative_file, prompts_from
from zoo.merge.learned.runtime import build_body, make_forward
from zoo.merge.learned.train import TaskData
from zoo.merge.learning import task_source
from zoo.merge.plan import Plan, read_input

if TYPE_CHECKING:
    from zoo.merge.learned.runtime import ModelForward
    from zoo.registry import Registry

FORMAT = "zoo-merge-statistics"
VERSION = 1  # bump when what is collected changes, so old artifacts are not reused
KINDS = ("gram", "fisher")
# What each statistic is called where a message names it.
WHAT = {"gram": "RegMean input Gram matrices", "fisher": "Fisher information"}
# The parameter that says on how many examples (FusionBench's names).
EXAMPLES = {"gram": "num_regmean_examples", "fisher": "num_fisher_examples"}
# Examples per forward pass, as FusionBench's dataloaders (batch_size 32). Grams do not
# depend on it; the Fisher's batch approximation does.
BATCH_SIZE = 32


@dataclass(frozen=True)
class Settings:
    """What decides an expert's statistics besides the expert and its data."""

    kind: str  # gram | fisher
    examples: int  # the first this many examples of the split
    batch_size: int
    split: str

    def key(self, data_sha256: str) -> str:
        """The artifact key: the kind and a digest of the settings and the data."""
        blob = json.dumps({"v": VERSION, "kind": self.kind, "examples": self.examples,
                           "batch_size": self.batch_size, "split": self.split, "data": data_sha256}, sort_keys=True)
        return f"{self.kind}-{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


@dataclass
class DataSource:
    """One expert's task data: its sha256 (known without reading it for a registry
    task) and how to load it."""

    task: str
    sha256: str
    load: Callable[[], TaskData]


class InMemory:
    """An unregistered expert's statistics, held in memory (there is no lineage to
    store them in), read like a safetensors file: ``tensors`` (name -> .shape),
    ``read_tensor`` and ``metadata``."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
        self.data, self.metadata = tensors, metadata
        self.tensors = {n: SimpleNamespace(shape=tuple(t.shape)) for n, t in tensors.items()}

    def read_tensor(self, name: str) -> torch.Tensor:
        return self.data[name]


@dataclass
class Statistics:
    """Every expert's statistics for one merge, read a tensor at a time (from its
    lineage artifact, or from memory for an unregistered expert)."""

    kind: str
    files: "list[Checkpoint | InMemory]"
    labels: list[str]
    norms: list[float] = field(default_factory=list)  # fisher: each expert's L2 norm over the merged tensors

    def tensors_known(self, name: str) -> bool:
        """True when every expert has a statistic for tensor ``name``, False when none
        has; a one-line error when only some have."""
        have = [name in f.tensors for f in self.files]
        if any(have) and not all(have):
            lacking = self.labels[have.index(False)]
            raise ZooError(f"{WHAT[self.kind]}: {lacking} has none for {name} but other experts have; the "
                           "statistics were collected on different models")
        return bool(have) and all(have)

    def tensors(self, name: str) -> list[torch.Tensor] | None:
        """Each expert's statistic for tensor ``name``; None when no expert has one."""
        return [f.read_tensor(name) for f in self.files] if self.tensors_known(name) else None


def data_source(plan: Plan, registry: "Registry | None", index: int, split: str, method: str) -> DataSource:
    """Expert ``index``'s task data, as the learned merges find it: ``parameters.data``
    (a file or folder), else its task (``parameters.task`` or its registered one) in
    the registry."""
    why = f" ({method} runs each expert on its own task's inputs)"
    src = task_source(plan, registry, index, why)
    base_dir = next(iter(plan.base.ckpt.files.values())).parent if plan.base is not None else None
    path, name, task = src.path, src.name, src.task
    if path is not None:
        if not path.exists():
            raise NotFound(f"data for {plan.models[index].label}: {path} does not exist")
        if is_generative_file(path):
            return DataSource(name, _hash_path(path), lambda: prompt_data(path, name, base_dir, split))
        return DataSource(name, _hash_path(path), lambda: from_path(path, name, base_dir, split, False))
    assert registry is not None and task is not None
    info = registry.task(task)
    if not info.get("data_sha256"):
        raise ZooError(f"{plan.models[index].label} has no task data{why}: its task {task!r} is registered "
                       "without data; register it with data, or set models[].parameters.data to a file")
    if info.get("data_format") == PROMPTS_FORMAT:
        return DataSource(task, info["data_sha256"], lambda: prompt_data(registry.task_data(task), task, base_dir, split))
    return DataSource(task, info["data_sha256"], lambda: from_registry(registry, task, split, False))


def prompt_data(path: Path, task: str, base_dir: Path | None, split: str) -> TaskData:
    """A generative task's prompts as model inputs: each prompt tokenised as the base's
    tokenizer does, right-padded, with its attention mask (the statistics skip the pad
    positions). A task's unlabeled split is its ``pool``: ``train`` reads it."""
    if base_dir is None:
        raise ZooError(f"task {task!r} is prompts, which need the base model's tokenizer")
    rows = prompts_from(path, task, DEFAULT_SPLIT if split == "train" else split)
    codec = TextCodec.from_folder(base_dir)
    ids = [codec.prompt_ids(r) for r in rows]
    batch = teacher_forced(ids, [[] for _ in ids], codec.pad_id)
    return TaskData(task, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})


def _hash_path(path: Path) -> str:
    """sha256 of a data file, or of a folder's files (names and contents, in order)."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def settings_for(plan: Plan) -> Settings:
    """The plan's settings, from its method's global parameters."""
    m, options = plan.method, plan.options("")
    assert m.statistics in KINDS
    return Settings(m.statistics, int(m.option(options, EXAMPLES[m.statistics])), BATCH_SIZE,
                    str(m.option(options, "split")))


def collect_for(plan: Plan, registry: "Registry | None", device: torch.device,
                log: Callable[[str], None] | None = None) -> tuple[Statistics, dict[str, Any]]:
    """Every expert's statistics for the plan: from its lineage artifact where it has
    one for these settings and data, else collected now (and stored on the expert when
    it is registered). Returns them and the lineage record of the merge."""
    method = plan.method.name
    settings = settings_for(plan)
    if plan.base is None:
        raise ZooError(f"{method} needs the base model")
    sources = [data_source(plan, registry, i, settings.split, method) for i in range(len(plan.models))]
    keys = [settings.key(s.sha256) for s in sources]
    files: "list[Checkpoint | InMemory | None]" = []
    for inp, key in zip(plan.models, keys):
        stored = None
        if registry is not None and inp.ref is not None:
            try:
                stored = open_safetensors(registry.artifact(inp.ref, key))
            except NotFound:
                stored = None
            if stored is not None and (stored.metadata.get("format") != FORMAT
                                       or stored.metadata.get("kind") != settings.kind):
                raise ZooError(f"the {key!r} artifact of {inp.ref} is not zoo's {WHAT[settings.kind]}")
        files.append(stored)
    missing = [i for i, f in enumerate(files) if f is None]
    if missing:
        _collect_missing(plan, registry, device, settings, sources, keys, missing, files, log)
    stats = Statistics(settings.kind, [f for f in files if f is not None], [m.label for m in plan.models])
    rule = _check(plan, stats)
    if settings.kind == "fisher":
        stats.norms = _norms(stats, rule["fisher_weighted"])
    record = {"kind": settings.kind, "examples": settings.examples, "batch_size": settings.batch_size,
              "split": settings.split, "version": VERSION,
              "experts": [{"model": m.ref or m.label, "task": s.task, "data_sha256": s.sha256, "artifact": k,
                           "examples": int(f.metadata.get("examples", 0))}
                          for m, s, k, f in zip(plan.models, sources, keys, files)],
              "tensors": rule_record(rule)}
    return stats, record


def _collect_missing(plan: Plan, registry: "Registry | None", device: torch.device, settings: Settings,
                     sources: list[DataSource], keys: list[str], missing: list[int],
                     files: "list[Checkpoint | InMemory | None]", log: Callable[[str], None] | None) -> None:
    """Run each expert in ``missing`` over its data; store each result on the expert
    when it is registered, and put it in ``files``."""
    from safetensors.torch import save_file

    assert plan.base is not None
    method = plan.method.name
    if not (folder_of(plan.base.ckpt) / "config.json").is_file():
        raise ZooError(f"{method} runs each expert on its task data, so the base needs its config.json")
    names = [st.out.name for st in plan.steps if st.merge]
    body = build_body(plan.base.ckpt, device)
    base_sd = {n: plan.base.ckpt.read_tensor(n) for n in names}
    for i in missing:
        inp, source = plan.models[i], sources[i]
        data = source.load()
        if len(data) == 0:
            raise ZooError(f"{inp.label}: task {source.task} has no examples in split {settings.split}")
        head = {n: read_input(inp, n, None).to(device) for n in plan.heads.get(i) or []}
        forward = make_forward(body, [head])
        params = {n: read_input(inp, n, base_sd[n]).to(device, torch.float32) for n in names}
        n = min(settings.examples, len(data))
        if log is not None:
            log(f"{method}: running {inp.label} over {n} examples of task {source.task} ({WHAT[settings.kind]})")
        try:
            if settings.kind == "gram":
                tensors = collect_grams(forward, params, data, n, settings.batch_size, device)
            else:
                tensors = collect_fisher(forward, params, data, n, settings.batch_size, device)
        except ZooError:
            raise
        except (RuntimeError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
            raise ZooError(f"{method}: transformers could not run {inp.label} on its task data "
                           f"({' '.join(str(e).split())[:200]})") from None
        del params
        if not tensors:
            raise ZooError(f"{method}: running {inp.label} reached no merged "
                           f"{'linear layer' if settings.kind == 'gram' else 'parameter'}; nothing to weigh with")
        meta = {"format": FORMAT, "kind": settings.kind, "version": str(VERSION), "examples": str(n),
                "batch_size": str(settings.batch_size), "split": settings.split, "task": source.task,
                "data_sha256": source.sha256, "expert": inp.ref or inp.label}
        if registry is None or inp.ref is None:
            files[i] = InMemory(tensors, meta)
            continue
        with tempfile.TemporaryDirectory(prefix="zoo-statistics-") as tmp:
            path = Path(tmp) / f"{keys[i]}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
            registry.attach_artifact(inp.ref, keys[i], path)
        files[i] = open_safetensors(registry.artifact(inp.ref, keys[i]))


def folder_of(ckpt: Checkpoint) -> Path:
    return next(iter(ckpt.files.values())).parent


def _batches(data: TaskData, n: int, batch_size: int, device: torch.device):
    for start in range(0, n, batch_size):
        stop = min(n, start + batch_size)
        yield {k: v[start:stop].to(device) for k, v in data.inputs.items()}, stop - start


def _checkpoint_names(forward: "ModelForward") -> dict[str, str]:
    """Module parameter name -> checkpoint name."""
    return {mod: ck for ck, mod in forward.body.to_module.items()}


def collect_grams(forward: "ModelForward", params: dict[str, torch.Tensor], data: TaskData, n: int,
                  batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Per merged ``nn.Linear`` weight: the per-token mean Gram matrix of the layer's
    inputs over the first ``n`` examples, keyed by the weight's checkpoint name."""
    to_ckpt = _checkpoint_names(forward)
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}

    mask: list[torch.Tensor | None] = [None]  # the batch's attention mask: pad positions are not inputs

    def hook(name: str):
        def record(module, args, output):
            x = args[0].detach()
            m = mask[0]
            x = x[m.bool()] if m is not None and x.dim() == 3 and x.shape[:2] == m.shape else x
            x = x.reshape(-1, x.shape[-1]).double()
            if name in sums:
                sums[name].addmm_(x.T, x)
            else:
                sums[name] = x.T @ x
            tokens[name] = tokens.get(name, 0) + x.shape[0]
        return record

    handles = []
    for mname, mod in forward.body.module.named_modules():
        if isinstance(mod, nn.Linear):
            weight = f"{mname}.weight"
            ck = to_ckpt.get(weight, weight)
            if ck in params:
                handles.append(mod.register_forward_hook(hook(ck)))
    try:
        with torch.no_grad():
            for batch, _ in _batches(data, n, batch_size, device):
                mask[0] = batch.get("attention_mask")
                forward(0, params, batch)
    finally:
        for h in handles:
            h.remove()
    return {name: (s / tokens[name]).float().cpu() for name, s in sums.items()}


def collect_fisher(forward: "ModelForward", params: dict[str, torch.Tensor], data: TaskData, n: int,
                   batch_size: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Per merged parameter: the label-free diagonal Fisher (FusionBench's batch
    approximation, see the module docstring) over the first ``n`` examples. Tensors
    the module holds as buffers get none."""
    to_ckpt = _checkpoint_names(forward)
    own = {to_ckpt.get(p, p) for p, _ in forward.body.module.named_parameters()}
    names = [k for k in params if k in own]
    leaves = {k: params[k].detach().clone().requires_grad_(True) for k in names}
    squares = {k: torch.zeros(params[k].shape, dtype=torch.float64, device=device) for k in names}
    count = 0
    for batch, rows in _batches(data, n, batch_size, device):
        logits = forward(0, {**params, **leaves}, batch).float()
        p = torch.softmax(logits, dim=-1).detach()
        terms = (p.sqrt() * torch.log_softmax(logits, dim=-1)).sum(dim=-1)
        if terms.dim() > 1 and "attention_mask" in batch:  # sequence logits: real tokens only
            terms = terms * batch["attention_mask"].to(terms.dtype)
        grads = torch.autograd.grad(terms.sum(), [leaves[k] for k in names], allow_unused=True)
        for k, g in zip(names, grads):
            if g is not None:
                squares[k].add_(g.double().square())
        count += rows
    return {k: (s / count).float().cpu() for k, s in squares.items()}


def _check(plan: Plan, stats: Statistics) -> dict[str, list[str]]:
    """Refuse statistics whose shapes do not fit the merged tensors (one line), and say
    which tensors get which rule."""
    ref = plan.base.ckpt if plan.base is not None else plan.models[0].ckpt
    weighed, mean = [], []
    for step in plan.steps:
        if not step.merge:
            continue
        name = step.out.name
        shape = tuple(ref.tensors[name].shape)
        for f, label in zip(stats.files, stats.labels):
            info = f.tensors.get(name)
            if info is None:
                continue
            got = tuple(info.shape)
            want = (shape[1], shape[1]) if stats.kind == "gram" and len(shape) == 2 else shape
            if (stats.kind == "gram" and len(shape) != 2) or got != want:
                raise ZooError(f"{WHAT[stats.kind]} of {label} do not match tensor {name}: {list(got)} for a tensor of "
                               f"shape {list(shape)}; they were collected on another model")
        (weighed if stats.tensors_known(name) else mean).append(name)
    key = "closed_form" if stats.kind == "gram" else "fisher_weighted"
    return {key: weighed, "mean": mean}


def rule_record(rule: dict[str, list[str]]) -> dict[str, Any]:
    """Which tensors got which rule, for the lineage: how many got each, and the names
    of those that got the plain mean."""
    return {**{k: len(v) for k, v in rule.items()}, "mean_tensors": rule["mean"]}


def _norms(stats: Statistics, names: list[str]) -> list[float]:
    """Each expert's L2 norm of its Fisher over the Fisher-weighted tensors (FusionBench's
    ``normalize_fisher_weight``), read a tensor at a time."""
    sums = [0.0] * len(stats.files)
    for name in names:
        for i, f in enumerate(stats.files):
            sums[i] += float(f.read_tensor(name).double().square().sum())
    return [s ** 0.5 for s in sums]
