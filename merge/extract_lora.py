"""``zoo extract-lora``: a PEFT LoRA adapter from an expert, by truncated SVD of its
task vector, as ``mergekit-extract-lora`` makes one.

For each linear weight, Delta = W_expert - W_base = U S V^T is cut to its top r
singular triplets (the Eckart-Young best rank-r approximation), and the adapter stores
A = sqrt(S_r) V_r^T and B = U_r sqrt(S_r) (``distribute_scale``; otherwise A = S_r V_r^T,
B = U_r), so that B @ A is the truncated Delta with PEFT's scale alpha / r = 1. This is
the storage side of Task Singular Vectors (TSV-C; Gargiulo et al., CVPR 2025, arXiv
2412.00081); LoRA itself is Hu et al., arXiv 2106.09685.

Which tensors, and how (mergekit's rules, read from tensor names and shapes instead of
a model instance):

* a module whose tensors are a 2-D floating ``weight`` (and a ``bias``) is a linear
  layer and is decomposed; its bias change is not carried (PEFT adapters hold none
  unless ``lora_bias``, which zoo's own LoRA reader refuses), and is reported;
* token and position embeddings and ``lm_head`` go to ``modules_to_save`` at full rank,
  or with ``embed_lora`` are decomposed too (embeddings transposed, as PEFT's
  ``lora_embedding_A/B``);
* any other module with parameters (norms, convolutions, parameters held directly)
  cannot be decomposed: it is saved at full rank in ``modules_to_save``, or left out
  with ``skip_undecomposable``;
* task heads (classifiers) are the expert's own and are always saved at full rank;
* ``include`` / ``exclude`` regular expressions (``re.search`` on the module name)
  choose the modules to decompose, as mergekit's ``-i`` / ``-e``.

The expert is streamed one tensor at a time: the factors go to a spill file as each
SVD finishes and are copied behind the safetensors header at the end (the header needs
every rank, which ``sv_epsilon`` decides only after each SVD), so memory stays near one
weight matrix's SVD. The adapter is written in a temporary folder and registered (kind
``adapter``, with the expert and the base as parents and each tensor's retained energy
in the lineage and card) or renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zoo.checkpoints.compat import compare
from zoo.checkpoints.heads import DEFAULT_HEAD_PATTERNS, is_head
from zoo.checkpoints.lora import PEFT_PREFIX
from zoo.checkpoints.reader import ADAPTER_CONFIG, ADAPTER_FILE, FLOAT_DTYPES, Checkpoint
from zoo.checkpoints.writer import OutTensor, ShardWriter, tensor_bytes, write_file
from zoo.errors import IncompatibleModels, ZooError
from zoo.progress import no_progress
from zoo.registry import card
from zoo.registry.destination import Destination
from zoo.registry.records import NewModel
from zoo.registry.resolve import open_model

if TYPE_CHECKING:
    from zoo.progress import ProgressFactory
    from zoo.registry import Registry

# Token/position embeddings and the LM head (LLaMA, BERT, CLIP, GPT-2, GPT-NeoX names).
EMBEDDING = re.compile(r"embed|lm_head|\bwte\b|\bwpe\b")
# Of those, the ones that are linear layers (out x in), not lookup tables (rows x dim).
OUTPUT_EMBEDDING = re.compile(r"(^|\.)(lm_head|embed_out)$")
SPILL_PIECE = 64 << 20  # bytes copied from the spill file into the adapter at a time
METHOD = "extract_lora"


@dataclass(frozen=True)
class ExtractOptions:
    """mergekit-extract-lora's options, with its defaults."""

    rank: int  # the most singular triplets kept per module (mergekit's --max-rank)
    distribute_scale: bool = True  # sqrt(S) on both factors; else S on A
    sv_epsilon: float = 0.0  # also drop singular values at or below this
    include: tuple[str, ...] = ()  # decompose only modules matching one of these
    exclude: tuple[str, ...] = ()  # never decompose modules matching one of these
    embed_lora: bool = False  # decompose embeddings and lm_head instead of saving them
    save_modules: tuple[str, ...] = ()  # module names (or last components) saved at full rank
    skip_undecomposable: bool = False  # leave out what cannot be decomposed instead of saving it

    def check(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise ZooError(f"--rank must be a positive whole number, not {self.rank!r}")
        if not self.sv_epsilon >= 0 or self.sv_epsilon == float("inf"):
            raise ZooError(f"--sv-epsilon must be a finite number >= 0, not {self.sv_epsilon!r}")
        for option, patterns in (("--include", self.include), ("--exclude", self.exclude)):
            for p in patterns:
                try:
                    re.compile(p)
                except re.error as e:
                    raise ZooError(f"{option} {p!r} is not a regular expression: {e}") from None

    def wants(self, module: str) -> bool:
        """Whether the include/exclude expressions let ``module`` be decomposed (mergekit's rule)."""
        if self.include and not any(re.search(p, module) for p in self.include):
            return False
        return not any(re.search(p, module) for p in self.exclude)


@dataclass(frozen=True)
class Target:
    """One module to decompose: its weight, and whether it is an embedding (Delta^T)."""

    module: str
    embedding: bool = False

    @property
    def tensor(self) -> str:
        return self.module + ".weight"

    def names(self) -> tuple[str, str]:
        """The A and B tensors' names in the adapter, as PEFT saves them."""
        if self.embedding:
            return (f"{PEFT_PREFIX}{self.module}.lora_embedding_A", f"{PEFT_PREFIX}{self.module}.lora_embedding_B")
        return f"{PEFT_PREFIX}{self.module}.lora_A.weight", f"{PEFT_PREFIX}{self.module}.lora_B.weight"


@dataclass
class ExtractionPlan:
    """What becomes of each expert tensor: decomposed, saved at full rank, or left out."""

    targets: list[Target] = field(default_factory=list)
    saved: list[str] = field(default_factory=list)  # expert tensors saved as they are
    save_keys: list[str] = field(default_factory=list)  # PEFT's modules_to_save
    dropped: dict[str, str] = field(default_factory=dict)  # tensor -> why its change is not in the adapter


@dataclass(frozen=True)
class Factors:
    """A truncated SVD as LoRA factors: B @ A approximates Delta (Delta^T for embeddings)."""

    a: torch.Tensor  # [rank, in]
    b: torch.Tensor  # [out, rank]
    rank: int
    energy: float  # sum of kept sigma^2 / sum of all sigma^2 (1.0 for a zero Delta)


def factorize(delta: torch.Tensor, rank: int, distribute_scale: bool = True, sv_epsilon: float = 0.0) -> Factors:
    """LoRA factors of ``delta`` (2-D, any float dtype) from its SVD in float32 (float64
    stays float64): rank min(rank, min(shape)), less where ``sv_epsilon`` drops more."""
    work = torch.float64 if delta.dtype == torch.float64 else torch.float32
    u, s, vh = torch.linalg.svd(delta.to(work), full_matrices=False)
    r = min(rank, s.shape[0])
    if sv_epsilon > 0:
        r = min(int((s > sv_epsilon).sum()), r)
    sq = s.square()
    total = float(sq.sum())
    energy = float(sq[:r].sum()) / total if total > 0 else 1.0
    if distribute_scale:
        root = s[:r].sqrt()
        a, b = vh[:r] * root[:, None], u[:, :r] * root
    else:
        a, b = vh[:r] * s[:r, None], u[:, :r]
    return Factors(a.contiguous(), b.contiguous(), r, energy)


def _module(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _ancestors(module: str) -> list[str]:
    parts = module.split(".") if module else []
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def plan_extraction(expert: Checkpoint, options: ExtractOptions,
                    head_patterns: tuple[str, ...] = DEFAULT_HEAD_PATTERNS) -> ExtractionPlan:
    """Sort the expert's tensors by mergekit's rules (see the module's docstring); the
    compatibility check against the base comes first (``extract``)."""
    by_module: dict[str, dict[str, str]] = {}
    for name in expert.tensors:
        module, leaf = _module(name)
        by_module.setdefault(module, {})[leaf] = name
    keys: list[str] = list(options.save_modules)
    kinds: dict[str, str] = {}  # module -> linear | embedding | other
    for module, params in by_module.items():
        weight = expert.tensors.get(params.get("weight", ""))
        if any(is_head(n, head_patterns) for n in params.values()):
            kind = "head"
        elif weight is None or len(weight.shape) != 2 or weight.dtype not in FLOAT_DTYPES \
                or set(params) - {"weight", "bias"}:
            kind = "other"
        elif EMBEDDING.search(module):
            kind = "embedding"
        else:
            kind = "linear"
        kinds[module] = kind
        last = module.rpartition(".")[2]
        if kind == "head" or (kind == "embedding" and not options.embed_lora
                              and not any(re.search(p, module) for p in options.exclude)):
            keys.append(last)
        elif kind == "other" and options.wants(module) and not options.skip_undecomposable:
            keys.append(last)
    keys = list(dict.fromkeys(k for k in keys if k))
    saved_modules = {m for m in by_module for a in _ancestors(m) if a.rpartition(".")[2] in keys or a in keys}
    plan = ExtractionPlan(save_keys=keys)
    for module, params in sorted(by_module.items()):
        names = sorted(params.values())
        if module in saved_modules:
            plan.saved += names
            continue
        kind = kinds[module]
        if kind in ("linear", "embedding") and options.wants(module):
            plan.targets.append(Target(module, embedding=kind == "embedding" and not OUTPUT_EMBEDDING.search(module)))
            if "bias" in params:
                plan.dropped[params["bias"]] = "bias of a decomposed layer (a LoRA adapter carries no bias)"
        else:
            why = "skipped: cannot be decomposed" if kind == "other" else "not chosen by --include/--exclude"
            for n in names:
                plan.dropped[n] = why
    return plan


def _check_pair(expert: Checkpoint, base: Checkpoint, expert_label: str, base_label: str,
                head_patterns: tuple[str, ...]) -> None:
    for ckpt, label, role in ((expert, expert_label, "expert"), (base, base_label, "base")):
        if ckpt.form == "adapter":
            raise ZooError(f"{label} is a LoRA adapter already; give the full {role} model")
    report = compare(expert, base, expert_label, base_label, head_patterns)
    if not report.ok:
        raise IncompatibleModels(f"{report.one_line()}; extract-lora needs an expert of that base")


def _target_modules(plan: ExtractionPlan, expert: Checkpoint, ranks: dict[str, int]) -> list[str]:
    """PEFT's target_modules: the decomposed modules' last name components, as mergekit
    writes them, unless those would also catch modules left out (then the full names)."""
    kept = [t.module for t in plan.targets if ranks[t.module] > 0]
    lasts = {m.rpartition(".")[2] for m in kept}
    others = {_module(n)[0] for n in expert.tensors} - set(kept)
    if any(o.rpartition(".")[2] in lasts for o in others):
        return sorted(kept)
    return sorted(lasts)


def adapter_config(plan: ExtractionPlan, expert: Checkpoint, base_label: str, ranks: dict[str, int],
                   task_type: str | None) -> dict[str, Any]:
    """adapter_config.json: r = lora_alpha = the largest rank, and rank_pattern =
    alpha_pattern for modules of another rank, so every scale is 1 (mergekit's config)."""
    r = max([v for v in ranks.values() if v > 0], default=1)
    other = {m: v for m, v in ranks.items() if 0 < v != r}
    return {
        "base_model_name_or_path": base_label, "peft_type": "LORA", "task_type": task_type,
        "r": r, "lora_alpha": r, "rank_pattern": other, "alpha_pattern": dict(other),
        "target_modules": _target_modules(plan, expert, ranks), "modules_to_save": plan.save_keys or None,
        "lora_dropout": 0.0, "use_rslora": False, "fan_in_fan_out": False, "bias": "none", "inference_mode": True,
    }


def _task_type(expert: Checkpoint) -> str | None:
    archs = (expert.config or {}).get("architectures") or []
    arch = archs[0] if archs else ""
    for suffix, task in (("ForCausalLM", "CAUSAL_LM"), ("ForSequenceClassification", "SEQ_CLS"),
                         ("ForTokenClassification", "TOKEN_CLS"), ("ForQuestionAnswering", "QUESTION_ANS")):
        if arch.endswith(suffix):
            return task
    return None


def _device(device: str) -> torch.device:
    from zoo.merge.engine import pick_device

    return pick_device(device)


def extract(expert: str, options: ExtractOptions, *, base: str | None = None, out: str | None = None,
            out_dir: "str | os.PathLike[str] | None" = None, registry: "Registry | None" = None, device: str = "auto",
            head_patterns: tuple[str, ...] = DEFAULT_HEAD_PATTERNS,
            progress: "ProgressFactory | None" = None) -> dict[str, Any]:
    """Extract a LoRA adapter from ``expert`` (a registry name or a folder) against
    ``base`` (default: the expert's registered base). With ``out`` (a name) it is
    registered as an ``adapter``; with ``out_dir`` it is written to that new folder. Returns what was
    made: where, each module's rank and retained energy, what was saved or left out."""
    options.check()
    dest = Destination.check(out, out_dir, registry)
    ckpt, info = open_model(expert, registry)
    if base is None:
        base = info.get("base") if info else None
        if base is None:
            raise ZooError(f"{expert} has no registered base; pass --base")
    base_ckpt, base_info = open_model(base, registry)
    expert_label, base_label = (info or {}).get("ref") or expert, (base_info or {}).get("ref") or base
    if dest.registers and base_info is None:
        raise ZooError(f"registering an adapter needs its base in the registry; add {base} first "
                       "(zoo add --kind base), or write a folder with --out-dir")
    if expert_label == base_label or ckpt.path.resolve() == base_ckpt.path.resolve():
        raise ZooError(f"{expert_label} is the base itself: its task vector is zero; name the fine-tuned expert")
    _check_pair(ckpt, base_ckpt, expert_label, base_label, head_patterns)
    plan = plan_extraction(ckpt, options, head_patterns)
    if not plan.targets:
        raise ZooError(f"no module of {expert_label} is left to decompose (check --include/--exclude)")
    dev = _device(device)
    progress = progress or no_progress
    with dest.workspace(".lora") as folder:
        ranks, energy, digests = _write(ckpt, base_ckpt, plan, options, folder, dev, progress, dest.label)
        config = adapter_config(plan, ckpt, base_label, ranks, _task_type(ckpt))
        digests[ADAPTER_CONFIG] = write_file(folder / ADAPTER_CONFIG, (json.dumps(config, indent=2) + "\n").encode())
        recipe = {"method": METHOD, "expert": expert_label, "base": base_label, **asdict(options),
                  "include": list(options.include), "exclude": list(options.exclude),
                  "save_modules": list(options.save_modules),
                  "ranks": ranks, "energy": energy, "modules_to_save": plan.save_keys,
                  "dropped": plan.dropped}
        summary = _summary(ranks, energy, plan, folder)
        digests["README.md"] = write_file(folder / "README.md",
                                          _card(dest.label, expert_label, base_label, options, summary,
                                                ranks, energy, plan).encode())
        tasks = list(info.get("tasks") or []) if info else []
        parents = [(role, ref) for role, ref, i in (("base", base_label, base_info), ("expert", expert_label, info))
                   if i is not None]
        kept = dest.keep(NewModel(folder, dest.label, "adapter", digests, base=base_label if base_info else None,
                                  parents=parents, recipe=recipe, tasks=tasks, head_patterns=head_patterns,
                                  metadata={"extract_lora": summary}, check_base=True))
    return {**kept, "expert": expert_label, "base": base_label, **summary,
            "modules": {m: {"rank": ranks[m], "energy": energy[m]} for m in ranks}, "dropped": plan.dropped}


def _summary(ranks: dict[str, int], energy: dict[str, float], plan: ExtractionPlan, folder: Path) -> dict[str, Any]:
    values = list(energy.values())
    return {"rank": max(ranks.values(), default=0), "decomposed": len(ranks), "saved_tensors": len(plan.saved),
            "dropped_tensors": len(plan.dropped), "modules_to_save": plan.save_keys,
            "energy_min": min(values, default=1.0), "energy_mean": sum(values) / len(values) if values else 1.0,
            "adapter_bytes": (folder / ADAPTER_FILE).stat().st_size}


def _write(expert: Checkpoint, base: Checkpoint, plan: ExtractionPlan, options: ExtractOptions, folder: Path,
           device: torch.device, progress: "ProgressFactory", label: str
           ) -> tuple[dict[str, int], dict[str, float], dict[str, str]]:
    """Factor each target into a spill file beside the adapter, then write the adapter:
    header first, the spill's bytes behind it, the saved tensors last."""
    ranks: dict[str, int] = {}
    energy: dict[str, float] = {}
    entries: list[OutTensor] = []
    total = sum(expert.tensors[t.tensor].nbytes for t in plan.targets) + \
        sum(expert.tensors[n].nbytes for n in plan.saved)
    advance = progress(f"extracting {label}", total, len(plan.targets) + len(plan.saved))
    with tempfile.TemporaryFile(dir=folder.parent) as spill:
        for t in plan.targets:
            info = expert.tensors[t.tensor]
            w = expert.read_tensor(t.tensor).to(device)
            work = torch.float64 if w.dtype == torch.float64 else torch.float32
            delta = w.to(work).sub_(base.read_tensor(t.tensor).to(device, work))
            del w
            f = factorize(delta.T if t.embedding else delta, options.rank, options.distribute_scale,
                          options.sv_epsilon)
            del delta
            ranks[t.module], energy[t.module] = f.rank, f.energy
            if f.rank > 0:
                dtype = info.dtype
                for tensor_name, x in zip(t.names(), (f.a, f.b)):
                    spill.write(tensor_bytes(x.to(_out_dtype(dtype)).cpu()))
                    entries.append(OutTensor(tensor_name, dtype, tuple(x.shape)))
            advance(info.nbytes, 1)
        spill.flush()
        spill.seek(0)
        saved = [OutTensor(PEFT_PREFIX + n, expert.tensors[n].dtype, expert.tensors[n].shape) for n in plan.saved]
        writer = ShardWriter(folder, [entries + saved])
        try:
            for e in entries:  # the writer takes each tensor's bytes apart from the next one's
                left = e.nbytes
                while left > 0:
                    piece = spill.read(min(left, SPILL_PIECE))
                    if not piece:
                        raise ZooError(f"the spill file of {label} ended early; nothing was kept")
                    writer.put(piece)
                    left -= len(piece)
            for n in plan.saved:
                writer.put(expert.read_bytes(n))
                advance(expert.tensors[n].nbytes, 1)
        except BaseException:
            writer.abort()
            raise
        digests = writer.close()
    (folder / "model.safetensors").rename(folder / ADAPTER_FILE)
    digests[ADAPTER_FILE] = digests.pop("model.safetensors")
    return ranks, energy, digests


def _out_dtype(name: str) -> torch.dtype:
    return {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[name]


def _card(name: str, expert: str, base: str, options: ExtractOptions, summary: dict[str, Any],
          ranks: dict[str, int], energy: dict[str, float], plan: ExtractionPlan) -> str:
    front = card.front_matter([base, expert], "adapter", ["lora", "peft", card.TAG])
    front["library_name"] = "peft"
    lines = [
        f"A LoRA adapter for `{base}`, extracted with zoo from `{expert}`: each linear weight's task vector "
        f"(expert minus base) cut to its top {options.rank} singular triplets (truncated SVD; TSV-C, arXiv "
        "2412.00081), as mergekit-extract-lora does. Load it with PEFT on the base.", "",
        f"- modules decomposed: {summary['decomposed']}, largest rank {summary['rank']}",
        f"- retained energy (sum of kept sigma^2 / sum of sigma^2): mean {summary['energy_mean']:.4f}, "
        f"min {summary['energy_min']:.4f}",
        f"- saved at full rank (modules_to_save): {', '.join(plan.save_keys) or 'none'}",
        f"- tensors whose change is not carried: {len(plan.dropped)}"
        + (" (biases of decomposed layers, or left out by the options)" if plan.dropped else ""), "",
        "| module | rank | retained energy |", "|---|---|---|",
        *[f"| `{m}` | {ranks[m]} | {energy[m]:.4f} |" for m in ranks], "",
    ]
    return card.render(front, name, lines)
