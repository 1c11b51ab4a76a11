"""The compatibility check before a merge: does an expert line up with its base?

Reports, by tensor name, tensors that are missing or extra, shape and dtype
mismatches, vocabulary size differences, and tied versus untied embeddings.
Task-specific heads (classifiers) are expected to differ and are reported as such,
never as errors. LoRA adapters (parsed by ``zoo.checkpoints.lora``) are checked module
by module against the base weights they would modify.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from zoo.checkpoints.lora import base_name, read_adapter
from zoo.checkpoints.heads import DEFAULT_HEAD_PATTERNS, is_head
from zoo.checkpoints.reader import FLOAT_DTYPES, Checkpoint

OUTPUT_EMBEDDINGS = ("lm_head.weight",)
INPUT_EMBEDDING_HINTS = ("embed_tokens.weight", "word_embeddings.weight", "wte.weight", "shared.weight")

ERROR, WARNING, INFO = "error", "warning", "info"


@dataclass(frozen=True)
class Finding:
    """One difference between a model and its base."""

    severity: str  # error | warning | info
    kind: str  # missing | extra | shape | dtype | vocab | tied | head | adapter | nonfinite
    tensor: str | None
    detail: str


@dataclass
class CompatReport:
    """All findings for one model against one base."""

    model: str
    base: str
    findings: list[Finding] = field(default_factory=list)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def ok(self) -> bool:
        return not self.errors

    def head_tensors(self) -> list[str]:
        return sorted({f.tensor for f in self.findings if f.kind == "head" and f.tensor})

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "base": self.base, "ok": self.ok, "findings": [asdict(f) for f in self.findings]}

    def one_line(self) -> str:
        """A one-line summary of the errors, for error messages."""
        errs = self.errors
        if not errs:
            return f"{self.model} is compatible with {self.base}"
        by_kind: dict[str, list[Finding]] = {}
        for f in errs:
            by_kind.setdefault(f.kind, []).append(f)
        parts = []
        for kind, items in by_kind.items():
            ex = items[0]
            label = {"missing": "missing tensors", "extra": "extra tensors", "shape": "shape mismatches",
                     "vocab": "vocabulary mismatch", "adapter": "adapter mismatches"}.get(kind, kind)
            where = f"{ex.tensor}: " if ex.tensor else ""
            parts.append(f"{len(items)} {label} (e.g. {where}{ex.detail})")
        return f"{self.model} does not match base {self.base}: " + "; ".join(parts)


def _tied(ckpt: Checkpoint) -> bool | None:
    """Whether the checkpoint ties its output embeddings to the input ones.

    ``None`` when the model has no token embeddings at all (vision models).
    """
    has_input = any(n.endswith(INPUT_EMBEDDING_HINTS) for n in ckpt.tensors)
    has_output = any(n in OUTPUT_EMBEDDINGS for n in ckpt.tensors)
    if not has_input and not has_output:
        return None
    cfg = ckpt.config if ckpt.form == "model" else None
    if cfg and "tie_word_embeddings" in cfg and not has_output:
        return bool(cfg["tie_word_embeddings"])
    return not has_output


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def compare(model: Checkpoint, base: Checkpoint, model_name: str = "model", base_name: str = "base",
            head_patterns: tuple[str, ...] = DEFAULT_HEAD_PATTERNS) -> CompatReport:
    """Compare a full checkpoint or a LoRA adapter with its base."""
    report = CompatReport(model_name, base_name)
    if base.form == "adapter":
        report.findings.append(Finding(ERROR, "adapter", None, f"{base_name} is a LoRA adapter, not a base model; "
                                                               "give the model it was trained on as the base"))
        return report
    if model.form == "adapter":
        _compare_adapter(model, base, report, head_patterns)
        return report
    add = report.findings.append

    vm = (model.architecture() or {}).get("vocab_size")
    vb = (base.architecture() or {}).get("vocab_size")
    if vm is not None and vb is not None and vm != vb:
        add(Finding(ERROR, "vocab", None, f"vocab_size {vm} vs base {vb}"))

    tm, tb = _tied(model), _tied(base)
    tie_names: set[str] = set()
    if tm is not None and tb is not None and tm != tb:
        add(Finding(WARNING, "tied", None,
                    f"{'tied' if tm else 'untied'} embeddings vs base {'tied' if tb else 'untied'}"))
        tie_names = set(OUTPUT_EMBEDDINGS)

    for name in sorted(set(base.tensors) | set(model.tensors)):
        a, b = model.tensors.get(name), base.tensors.get(name)
        head = is_head(name, head_patterns)
        if a is None or b is None:
            if head:
                add(Finding(INFO, "head", name, "task head only in " + ("base" if a is None else "model")))
            elif name in tie_names:
                continue
            elif a is None:
                add(Finding(ERROR, "missing", name, f"in base {_fmt(b.shape)} but not in model"))
            else:
                add(Finding(ERROR, "extra", name, f"in model {_fmt(a.shape)} but not in base"))
            continue
        if a.shape != b.shape:
            if head:
                add(Finding(INFO, "head", name, f"task head {_fmt(a.shape)} vs base {_fmt(b.shape)}"))
            else:
                add(Finding(ERROR, "shape", name, f"{_fmt(a.shape)} vs base {_fmt(b.shape)}"))
        elif head:
            add(Finding(INFO, "head", name, "task head (not merged)"))
        if a.dtype != b.dtype:
            add(Finding(WARNING, "dtype", name, f"{a.dtype} vs base {b.dtype}"))
    return report


def _compare_adapter(adapter: Checkpoint, base: Checkpoint, report: CompatReport,
                     head_patterns: tuple[str, ...]) -> None:
    """Check every LoRA pair against the base weight it modifies (``zoo.checkpoints.lora``
    parses the adapter, as the merge planner does)."""
    add = report.findings.append
    parsed = read_adapter(adapter)
    for name in parsed.unsupported:
        add(Finding(ERROR, "adapter", base_name(name), "a LoRA variant zoo cannot merge (DoRA magnitudes, AdaLoRA "
                                                       "singular values or LoRA biases); merge it into the model first"))
    # Full tensors saved by modules_to_save: compared like a full checkpoint's.
    for key, name in parsed.saved.items():
        info = adapter.tensors[name]
        b = base.tensors.get(key)
        if b is None:
            add(Finding(INFO if is_head(key, head_patterns) else ERROR,
                        "head" if is_head(key, head_patterns) else "extra", key, "saved module not in base"))
        elif b.shape != info.shape:
            head = is_head(key, head_patterns)
            add(Finding(INFO if head else ERROR, "head" if head else "shape", key,
                        f"{_fmt(info.shape)} vs base {_fmt(b.shape)}"))
    for pair in sorted(parsed.pairs.values(), key=lambda p: p.module):
        target = base.tensors.get(pair.target)
        if target is None:
            add(Finding(ERROR, "missing", pair.target, "adapter targets a module the base does not have"))
            continue
        parts = "lora_embedding_A or lora_embedding_B" if pair.embedding else "lora_A or lora_B"
        if not pair.complete:
            add(Finding(ERROR, "adapter", pair.module, f"{parts} is missing"))
            continue
        a, b = adapter.tensors[pair.a].shape, adapter.tensors[pair.b].shape
        if not pair.fits(a, b, target.shape):
            what = "embedding " if pair.embedding else ""
            add(Finding(ERROR, "adapter", pair.module,
                        f"{what}B{_fmt(b)}·A{_fmt(a)} does not fit base {_fmt(target.shape)}"))
    if adapter.config:
        r = adapter.config.get("r")
        if not parsed.pairs:
            add(Finding(WARNING, "adapter", None, "adapter has no LoRA weights"))
        elif r is not None:
            ranks = {adapter.tensors[p.a].shape[0] for p in parsed.pairs.values() if p.a and not p.embedding}
            if ranks and ranks != {r} and not adapter.config.get("rank_pattern"):
                add(Finding(WARNING, "adapter", None, f"adapter_config r={r} but weights have rank {sorted(ranks)}"))


def nonfinite(ckpt: Checkpoint, piece: int = 1 << 22) -> list[Finding]:
    """An error for each floating-point tensor holding a NaN or an infinity. Unlike
    ``compare`` (headers only), this reads every value, a piece at a time."""
    import torch

    found = []
    buf = None
    for name, info in ckpt.tensors.items():
        if info.dtype not in FLOAT_DTYPES:
            continue
        for off in range(0, info.numel, piece):
            n = min(piece, info.numel - off)
            if buf is None or buf.numel() < n * 8:
                buf = torch.empty(piece * 8, dtype=torch.uint8)
            x = ckpt.read_range(name, off, n, out=buf)
            if not bool(torch.isfinite(x).all()):
                bad = int((~torch.isfinite(x)).sum())
                found.append(Finding(ERROR, "nonfinite", name, f"NaN or infinite values ({bad} in elements "
                                                                 f"{off}..{off + n}); a merge refuses them"))
                break
    return found
