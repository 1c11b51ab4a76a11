"""From a merge plan (registry names or paths) to a learned merge's parameters: read the
base and task vectors, build the model and each task's head, load each task's data and
each task's teacher, and hand them to the method's ``learn``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zoo.checkpoints.compat import compare
from zoo.checkpoints.prompts import Prompt
from zoo.checkpoints.heads import is_head
from zoo.errors import IncompatibleModels, ZooError
from zoo.registry.resolve import open_model
from zoo.textgen import TextCodec
from zoo.checkpoints.taskdata import task_info

from zoo.merge.plan import Plan, read_input
from zoo.merge.learned.generative import prompt_task_data
from zoo.merge.learned.data import from_path, from_registry, from_task_file, is_generative_file, prompts_from
from zoo.merge.learned.objectives import default_split, supervised
from zoo.merge.learned.parity import Log, Teacher, TeacherFactory
from zoo.merge.starts import resolve_start
from zoo.merge.teacher_answers import Expect, RegistryDecodes
from zoo.merge.learned.inputs import Parts
from zoo.merge.learned.runtime import build_body, make_forward
from zoo.merge.learned.start import Start
from zoo.merge.learned.train import Report, Result, TaskData

if TYPE_CHECKING:
    from zoo.registry import Registry


def task_data(plan: Plan, registry: "Registry | None", objective: str, split: str | None) -> list[TaskData]:
    """Each task's data for ``objective``: inputs (and labels) of a split, or, for
    generative tasks, their prompts (``merge.learned.generative``)."""
    prompts = task_prompts(plan, registry, split or default_split(objective, generative=True))
    if prompts is not None:
        names = [_task_name(spec, inp) or inp.label for spec, inp in zip(plan.recipe.models, plan.models)]
        return prompt_task_data(names, prompts, text_codec(plan), objective,
                                split or default_split(objective, generative=True))
    labelled = supervised(objective)
    split = split or default_split(objective)
    base_dir = next(iter(plan.base.ckpt.files.values())).parent if plan.base is not None else None
    data = []
    for i in range(len(plan.models)):
        src = task_source(plan, registry, i)
        if src.path is not None:
            data.append(from_path(src.path, src.name, base_dir, split, labelled))
        else:
            assert registry is not None and src.task is not None
            data.append(from_registry(registry, src.task, split, labelled))
    return data


@dataclass(frozen=True)
class TaskSource:
    """Where model ``i``'s task data is: its ``parameters.data`` file or folder, else
    its task (``parameters.task`` or its registered one) in the registry."""

    name: str  # the task's name, or the model's label where it has none
    task: str | None  # the registry task, when the data is the registered task's
    path: Path | None  # parameters.data; None: the registered task's data


def task_source(plan: Plan, registry: "Registry | None", i: int, why: str = "") -> TaskSource:
    """Model ``i``'s task data, found the one way the learned merges and the data-aware
    statistics find it; ``why`` says in the error what the data is for. (``eval_data``
    reads only the registered task's split: measured, never trained on.)"""
    spec, inp = plan.recipe.models[i], plan.models[i]
    task = _task_name(spec, inp)
    if spec.parameters.get("data"):
        return TaskSource(task or inp.label, task, Path(spec.parameters["data"]))
    if task is not None and registry is not None:
        return TaskSource(task, task, None)
    raise ZooError(f"{inp.label} has no task data{why}: register its task with data, or set "
                   "models[].parameters.data to a file")


def task_prompts(plan: Plan, registry: "Registry | None", split: str) -> list[list[Prompt]] | None:
    """Each task's generative records (prompts, with answers where the data has them)
    of ``split``; None when the tasks are not generative (inputs and labels). A merge's
    tasks are all generative or none is."""
    found: list[list[Prompt] | None] = []
    for i in range(len(plan.models)):
        src = task_source(plan, registry, i)
        path = src.path if src.path is not None else registry.task_data(src.task)  # type: ignore[union-attr,arg-type]
        found.append(prompts_from(path, src.name, split) if is_generative_file(Path(path)) else None)
    if all(f is None for f in found):
        return None
    if any(f is None for f in found):
        raise ZooError("a learned merge's tasks must all be generative (JSONL prompts) or all have inputs and labels")
    return found  # type: ignore[return-value]


def text_codec(plan: Plan) -> TextCodec:
    """The base model's tokenizer, for generative tasks."""
    assert plan.base is not None
    folder = next(iter(plan.base.ckpt.files.values())).parent
    context = (plan.base.ckpt.config or {}).get("max_position_embeddings")
    return TextCodec.from_folder(folder, context=int(context) if context else None)


def _task_name(spec, inp) -> str | None:
    return spec.parameters.get("task") or (inp.tasks[0] if inp.tasks else None)


def eval_data(plan: Plan, registry: "Registry | None", split: str | None) -> list[TaskData | None]:
    """Each registered task's labelled ``split``, where it has one: measured each parity
    round, never trained on."""
    out: list[TaskData | None] = []
    for spec, inp in zip(plan.recipe.models, plan.models):
        task = _task_name(spec, inp)
        if split is None or split == "none" or task is None or registry is None:
            out.append(None)
            continue
        try:
            path = registry.task_data(task)
        except ZooError:
            out.append(None)
            continue
        out.append(from_task_file(path, task, split, True) if split in task_info(path)["splits"] else None)
    return out


def read_parts(plan: Plan, device: torch.device) -> Parts:
    assert plan.base is not None
    names = [st.out.name for st in plan.steps if st.merge]
    base_sd = {n: plan.base.ckpt.read_tensor(n) for n in names}
    tvs = [{n: read_input(m, n, base_sd[n]).float() - base_sd[n].float() for n in names} for m in plan.models]
    body = build_body(plan.base.ckpt, device)
    base_heads = [n for n in plan.base.ckpt.tensors if is_head(n, tuple(plan.recipe.heads))]
    heads = []
    for i, m in enumerate(plan.models):
        names_i = plan.heads.get(i) or []
        if not names_i and base_heads:
            raise ZooError(f"{m.label} has no task head ({', '.join(base_heads[:2])}...); each task runs through "
                           "its own expert's head")
        heads.append({n: read_input(m, n, None).to(device) for n in names_i})
    return Parts(names, base_sd, tvs, body, heads, make_forward(body, heads))


def _autocast(options: dict[str, Any], device: torch.device) -> bool:
    on = options.get("precision", "auto") == "bf16" or (options.get("precision", "auto") == "auto"
                                                         and device.type == "cuda")
    if on and device.type != "cuda":
        raise ZooError("precision bf16 is for CUDA; on the CPU use precision fp32")
    return on


@dataclass
class PlanInputs:
    """What a learned method reads from a merge plan: its resolved global parameters,
    each task's data, the base and task vectors with the runnable model, each task's
    teacher, and the start a distillation begins from. The method's ``learn`` asks
    for what it needs, in the order it needs it."""

    plan: Plan
    registry: "Registry | None"
    device: torch.device
    report: Report | None = None
    log: Log | None = None

    @property
    def options(self) -> dict[str, Any]:
        return self.plan.options("")

    @property
    def seed(self) -> int:
        return self.plan.recipe.seed

    @property
    def autocast(self) -> bool:
        """bf16 autocast: precision bf16, or auto on CUDA (a one-line error for bf16 on the CPU)."""
        return _autocast(self.options, self.device)

    @property
    def pad_id(self) -> int:
        """The token id a dropped token becomes: the base's pad token."""
        assert self.plan.base is not None
        return int((self.plan.base.ckpt.config or {}).get("pad_token_id") or 0)

    def task_data(self, objective: str, split: str | None) -> list[TaskData]:
        return task_data(self.plan, self.registry, objective, split)

    def eval_data(self, split: str | None) -> list[TaskData | None]:
        return eval_data(self.plan, self.registry, split)

    def prompts(self, split: str) -> list[list[Prompt]] | None:
        """Each task's generative records of ``split``; None when the tasks are not generative."""
        return task_prompts(self.plan, self.registry, split)

    def codec(self) -> TextCodec:
        return text_codec(self.plan)

    def task_names(self) -> list[str]:
        """Each model's task: its ``task`` parameter, its registered task, or its label."""
        return [_task_name(spec, inp) or inp.label for spec, inp in zip(self.plan.recipe.models, self.plan.models)]

    def parts(self) -> Parts:
        return read_parts(self.plan, self.device)

    def teachers(self, parts: Parts) -> tuple[list[TeacherFactory], list[str]]:
        return _teachers(self.plan, self.registry, parts, self.device)

    def decode_cache(self, sources: list[str], sizes: list[int], max_new_tokens: int,
                     sampled: bool) -> RegistryDecodes | None:
        """Where each registered teacher's decodes of its pool (``sizes[t]`` prompts) are
        kept between runs (``merge.teacher_answers``); None without a registry or a
        registered base (an expert teaches as base + its task vector)."""
        assert self.plan.base is not None
        if self.registry is None or self.plan.base.ref is None:
            return None
        refs = [src if self.registry.has(src) else None for src in sources]
        vocabulary = (self.plan.base.ckpt.config or {}).get("vocab_size")
        expect = Expect(sizes, max_new_tokens, sampled, int(vocabulary) if vocabulary else None)
        return RegistryDecodes(self.registry, refs, self.plan.base.ref, expect, self.log)

    def start(self, spec: str, task_vectors: list[dict[str, torch.Tensor]]) -> Start:
        """The start ``spec`` names, over these task vectors (``merge.starts``)."""
        plan = self.plan
        assert plan.base is not None
        return resolve_start(spec, plan.recipe.to_dict(), [m.ref or m.label for m in plan.models],
                             plan.base.ref or plan.base.label, self.registry, task_vectors)


def learn_from_plan(plan: Plan, registry: "Registry | None", device: torch.device,
                    report: Report | None = None, log: Log | None = None) -> tuple[Result, dict[str, Any]]:
    """Run the plan's learned merge (its method's ``learn``); returns the result and
    what to record in the lineage."""
    inputs = PlanInputs(plan, registry, device, report, log)
    return plan.method.learn(inputs)


def _teachers(plan: Plan, registry: "Registry | None", parts: Parts,
              device: torch.device) -> tuple[list[TeacherFactory], list[str]]:
    """Each task's teacher: its expert (θ₀ + τₜ with its own head), or the model its
    ``teacher`` parameter names (same architecture as the base, the same label set)."""
    assert plan.base is not None
    factories: list[TeacherFactory] = []
    sources = []
    for i, (spec, inp) in enumerate(zip(plan.recipe.models, plan.models)):
        label = spec.parameters.get("teacher")
        if label is None:
            def expert(i: int = i) -> Teacher:
                params = {n: parts.base[n].to(device, torch.float32) + parts.task_vectors[i][n].to(device)
                          for n in parts.names}
                return lambda batch: parts.forward(i, params, batch)
            factories.append(expert)
            sources.append(inp.ref or inp.label)
            continue
        ckpt, info = open_model(label, registry)
        found = compare(ckpt, plan.base.ckpt, label, plan.base.label, tuple(plan.recipe.heads))
        if not found.ok:
            raise IncompatibleModels(f"teacher {found.one_line()}")
        head = sorted(set(found.head_tensors()) & set(ckpt.tensors))
        if not head and parts.heads[i]:
            raise ZooError(f"teacher {label} has no task head; a teacher labels its task through its own head")
        _same_labels(ckpt, inp.ckpt, label, inp.label)
        forward = make_forward(parts.body, [{n: ckpt.read_tensor(n).to(device) for n in head}])

        def named(ckpt=ckpt, forward=forward) -> Teacher:
            params = {n: ckpt.read_tensor(n).to(device, torch.float32) for n in parts.names}
            return lambda batch: forward(0, params, batch)
        factories.append(named)
        sources.append(info["ref"] if info else label)
    return factories, sources


def _same_labels(teacher, student, teacher_label: str, student_label: str) -> None:
    """Refuse a teacher whose config names other labels than the expert whose head the
    merged model uses for that task (default LABEL_k names say nothing, and pass)."""
    def labels(ckpt) -> dict[str, str] | None:
        id2label = (ckpt.config or {}).get("id2label") or {}
        named = {str(k): str(v) for k, v in id2label.items()}
        return None if not named or all(v == f"LABEL_{k}" for k, v in named.items()) else named

    a, b = labels(teacher), labels(student)
    if a is not None and b is not None and a != b:
        raise ZooError(f"teacher {teacher_label} predicts labels {sorted(a.values())[:5]}..., but {student_label}'s "
                       f"head predicts {sorted(b.values())[:5]}...; a teacher must share the head's label set")
