"""``zoo demo --llm``: the LLM demo zoo registered, merged, protected and measured.

The cached LLM demo zoo (``zoo.demo.llm_zoo``: a tiny character-level Llama base and
one expert per synthetic text task) is registered with its generative tasks, then
merged by ordinary recipes and measured by ``zoo eval`` (greedy exact match on each
task's test prompts):

- task arithmetic (arXiv 2212.04089), TIES (arXiv 2306.01708, density 0.2, dis-sum)
  and DARE-TIES (arXiv 2311.03099, density 0.5, seed 0), each λ chosen on the
  validation prompts from ``WEIGHTS`` (in memory, never on test);
- AdaMerging (arXiv 2310.02575) and Concrete TA (arXiv 2312.06173), each with the
  label-free ``entropy`` objective on the unlabeled pool and the supervised ``ce``
  objective on the labelled validation prompts;
- parity distillation from task arithmetic (label-free, on the pools; after MPA);
- MergeLock: one expert protected and merged with the others by task arithmetic.

A recipe that fails (a method that does not yet run on causal LMs) leaves its row
"not run" with the error, never a number. The whole tour runs on the build's fixed
torch threads with deterministic algorithms: the same seed gives the same table.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.checkpoints.prompts import read_prompts, write_task_prompts
from zoo.demo.build import deterministic
from zoo.demo.llm_zoo import LLM_BUILD_THREADS, LLM_FULL, LLM_QUICK, SPLITS, LlmDemoConfig, exact_match, llm_zoo
from zoo.errors import ZooError

if TYPE_CHECKING:
    import torch

    from zoo.registry import Registry

Report = Callable[[int, int, float, float], None]

METRIC = "exact_match"
VICTIM = "rev"  # the protected expert: one whose task task arithmetic keeps well, so the loss shows
# λ (each expert's weight) tried on the validation prompts for the data-free merges
WEIGHTS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
STATIC = {
    "ta": ("task_arithmetic", {}, {}),
    "ties": ("ties", {"density": 0.2}, {"normalize": False}),
    "dare-ties": ("dare_ties", {"density": 0.5}, {}),
}
STATIC_LABELS = {"ta": "task arithmetic", "ties": "TIES (density 0.2, dis-sum)",
                 "dare-ties": "DARE-TIES (density 0.5, seed 0)"}
# The learned merges through ordinary recipes: entropy learns on the unlabeled pool, ce on
# the labelled validation prompts (supervised); 100 steps. The learning rate per objective
# is the better on val of 1e-3 and 1e-2 for AdaMerging (entropy 75.0 and 69.5, ce 79.2 at
# 1e-2; 3e-2 and 300 steps were no better for ce), and Concrete TA takes the same.
LEARNED_LR = {"entropy": 1e-3, "ce": 1e-2}
LEARNED = {
    f"{key}-{objective}": (method, {"steps": 100, "lr": LEARNED_LR[objective], **extra, "objective": objective,
                                    "split": "pool" if objective == "entropy" else "val"})
    for objective in ("entropy", "ce")
    for key, method, extra in (("am-layer", "adamerging", {"coefficients": "layer"}),
                               ("concrete-ta", "concrete_ta", {}))
}
LEARNED_LABELS = {"am-layer": "AdaMerging layer-wise", "concrete-ta": "Concrete TA"}
PARITY = {"parity-ta": ("parity", {"rounds": 2, "steps": 50, "train": "coefficients,params", "split": "pool",
                                   "max_new_tokens": 12,
                                   "start": "{prefix}-ta"})}
PARITY_LABEL = "parity from task arithmetic (label-free, the pools)"


def prefix_of(cfg: LlmDemoConfig) -> str:
    return "llm-quick" if cfg == LLM_QUICK else "llm"


@dataclass
class LlmTour:
    """What ``zoo demo --llm`` did: the zoo, its registered models, one exact-match row
    per model or merge (a row that did not run says why), and the protection summary."""

    config: LlmDemoConfig
    folder: Path
    built: bool
    base: str
    experts: dict[str, str]
    table: list[dict[str, Any]]
    protection: dict[str, Any] | None
    seconds: float
    cpu_seconds: float
    registry: Path
    prefix: str
    selected: dict[str, dict[str, Any]] = field(default_factory=dict)
    parity: dict[str, Any] | None = None
    threads: int = LLM_BUILD_THREADS  # torch threads the merges and measurements ran on

    @property
    def tasks(self) -> list[str]:
        return list(self.experts)

    def to_dict(self) -> dict[str, Any]:
        """The JSON of ``zoo demo --llm --json``."""
        return {"config": asdict(self.config), "folder": str(self.folder), "built": self.built, "base": self.base,
                "experts": self.experts, "table": self.table, "protection": self.protection,
                "selected_on_val": self.selected, "parity": self.parity, "threads": self.threads, "seconds": self.seconds, "cpu_seconds": self.cpu_seconds,
                "registry": str(self.registry)}


def register_llm_zoo(registry: "Registry", cfg: LlmDemoConfig, folder: Path, prefix: str,
                     log: Callable[[str], None] = print) -> tuple[str, dict[str, str]]:
    """Register the zoo's generative tasks (every split in one JSONL file), its base and
    its experts; reuse them when this build is already registered."""
    key = cfg.key()
    base_name = f"{prefix}-base"
    if registry.has(base_name) and registry.show(base_name)["metadata"].get("llm_demo_key") == key:
        log(f"the LLM demo zoo is already registered in {registry.path}")
        return registry.show(base_name)["ref"], {t: registry.show(f"{prefix}-{t}")["ref"] for t in cfg.tasks}
    meta = {"llm_demo_key": key, "llm_demo_config": asdict(cfg)}
    with tempfile.TemporaryDirectory(prefix="zoo-llm-tasks-") as tmp:
        for task in cfg.tasks:
            path = Path(tmp) / f"{task}.jsonl"
            write_task_prompts(path, {s: read_prompts(folder / "tasks" / task / f"{s}.jsonl") for s in SPLITS})
            registry.add_task(task, data=path, description=f"LLM demo: {task} (synthetic, checkable answers)",
                              replace=True)
    renew = registry.has(base_name)
    base = registry.add(folder / "base", base_name, "base", tags=["demo", "llm"], metadata=meta,
                        new_version=renew)["ref"]
    experts = {t: registry.add(folder / "experts" / t, f"{prefix}-{t}", "expert", base=base, tasks=[t],
                               tags=["demo", "llm"], metadata=meta,
                               new_version=registry.has(f"{prefix}-{t}"))["ref"] for t in cfg.tasks}
    log(f"registered {base}, {len(experts)} experts and their generative tasks in {registry.path}")
    return base, experts


def measure(registry: "Registry", ref: str, tasks: list[str], split: str = "test") -> dict[str, float]:
    """Exact match per task (``zoo eval``), from the recorded metrics where there are some."""
    from zoo.evaluate import evaluate

    recorded = {m["task"]: m["value"] for m in registry.metrics(ref) if m["metric"] == METRIC and m["split"] == split}
    missing = [t for t in tasks if t not in recorded]
    if missing:
        recorded.update({r["task"]: r["value"] for r in evaluate(registry, ref, missing, split=split)})
    return {t: recorded[t] for t in tasks}


def _average(row: dict[str, Any], tasks: list[str]) -> dict[str, Any]:
    return {**row, "avg": sum(row[t] for t in tasks) / len(tasks)}


def select_weights(folder: Path, cfg: LlmDemoConfig, log: Callable[[str], None] = print) -> dict[str, dict[str, Any]]:
    """Each data-free merge's λ from ``WEIGHTS``: the best average exact match on the
    validation prompts, the merge computed in memory (``zoo.merge.state_dicts``)."""
    from transformers import LlamaForCausalLM

    from zoo.merge import state_dicts

    model = LlamaForCausalLM.from_pretrained(folder / "base").eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = [LlamaForCausalLM.from_pretrained(folder / "experts" / t).state_dict() for t in cfg.tasks]
    val = {t: read_prompts(folder / "tasks" / t / "val.jsonl") for t in cfg.tasks}
    out = {}
    for key, (method, model_params, params) in STATIC.items():
        scores = {}
        for lam in WEIGHTS:
            merged = state_dicts.merge_state_dicts(method, base, experts,
                                                   [{**model_params, "weight": lam} for _ in experts], **params)
            model.load_state_dict(merged)
            scores[lam] = sum(exact_match(model, val[t]) for t in cfg.tasks) / len(cfg.tasks)
        best = max(WEIGHTS, key=lambda lam: (scores[lam], -lam))  # ties: the smaller λ
        out[key] = {"weight": best, "val_avg": scores[best], "val_by_weight": {str(k): v for k, v in scores.items()}}
        log(f"{STATIC_LABELS[key]}: λ {best} on val (average exact match {100 * scores[best]:.1f}%)")
    return out


def _recipe(method: str, base: str, experts: list[str], params: dict[str, Any], model_params: dict[str, Any]):
    from zoo.merge.recipe import from_dict

    return from_dict({"merge_method": method, "base_model": base, "parameters": params, "seed": 0,
                      "models": [{"model": ref, "parameters": dict(model_params)} for ref in experts]})


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident memory (Linux: ``5`` to ``/proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_mib() -> float | None:
    """This process's peak resident memory since the last reset (``VmHWM``), in MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def _merge(registry: "Registry", name: str, method: str, base: str, experts: list[str], params: dict[str, Any],
           model_params: dict[str, Any], log: Callable[[str], None], report: Report | None) -> dict[str, Any]:
    """Run one recipe into ``name`` (unless registered already): its wall and CPU seconds,
    the process's peak memory while it ran and, for a learned merge, its steps per second;
    or why it could not run."""
    from zoo.merge.run import run

    if registry.has(name):
        return {}
    reset = _reset_peak_rss()
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        run(_recipe(method, base, experts, params, model_params), name, registry=registry, device="cpu",
            report=report, log=log)
    except (ZooError, NotImplementedError) as e:
        reason = " ".join(str(e).split())[:300] or type(e).__name__
        log(f"{method} ({name}) did not run: {reason}")
        return {"not_run": reason}
    took: dict[str, Any] = {"seconds": round(time.perf_counter() - t0, 2),
                            "cpu_seconds": round(time.process_time() - c0, 2),
                            "peak_rss_mib": _peak_rss_mib() if reset else None}
    learned = (registry.show(name)["recipe"] or {}).get("learned") or {}
    steps = sum(learned.get(k) or 0 for k in ("steps", "stage2_steps"))
    if steps and learned.get("seconds"):
        took["steps_per_second"] = round(steps / learned["seconds"], 2)
    log(f"merged the experts with {method} into {name} in {took['seconds']:.1f} s")
    return took


def _row(registry: "Registry", label: str, name: str, tasks: list[str], ran: dict[str, Any],
         extra: dict[str, Any] | None = None) -> dict[str, Any]:
    row = {"method": label, "model": name, **(extra or {}), **ran}
    if "not_run" in ran:
        return row
    return _average({**row, **measure(registry, name, tasks)}, tasks)


def merge_rows(registry: "Registry", base: str, experts: dict[str, str], prefix: str,
               selected: dict[str, dict[str, Any]], *, learned: bool = True, steps_scale: float = 1.0,
               log: Callable[[str], None] = print, report: Report | None = None) -> list[dict[str, Any]]:
    """The data-free merges at their λ chosen on val, then (with ``learned``) the learned
    merges and parity, each one ordinary recipe; one exact-match row each."""
    tasks, refs = list(experts), list(experts.values())
    rows = []
    for key, (method, model_params, params) in STATIC.items():
        lam = selected[key]["weight"]
        name = f"{prefix}-{key}"
        ran = _merge(registry, name, method, base, refs, params, {**model_params, "weight": lam}, log, None)
        rows.append(_row(registry, f"{STATIC_LABELS[key]}, λ {lam} (val)", name, tasks, ran))
    if not learned:
        return rows
    specs = {**LEARNED, **PARITY}
    for key, (method, params) in specs.items():
        params = {k: v.format(prefix=prefix) if isinstance(v, str) else v for k, v in params.items()}
        for k in ("steps", "stage2_steps"):
            if k in params:
                params[k] = max(1, round(params[k] * steps_scale))
        name = f"{prefix}-{key}"
        ran = _merge(registry, name, method, base, refs, params, {}, log, report)
        if key in PARITY:
            label = PARITY_LABEL
        else:
            objective = params["objective"]
            label = f"{LEARNED_LABELS[key.rsplit('-', 1)[0]]}, {objective}" + \
                (" (supervised, val)" if objective == "ce" else " (label-free, pool)")
        rows.append(_row(registry, label, name, tasks, ran, {"objective": params.get("objective", "parity")}))
    return rows


def protect_rows(registry: "Registry", base: str, experts: dict[str, str], prefix: str, weight: float,
                 victim: str, log: Callable[[str], None] = print) -> dict[str, Any]:
    """MergeLock on one expert: merged by task arithmetic (λ ``weight``) with the others,
    the protected expert breaks its task; alone, it scores as the original. The first
    row is the same merge without protection."""
    from zoo.protect.run import protect

    tasks = list(experts)
    locked = f"{prefix}-{victim}-locked"
    if not registry.has(locked):
        info = protect(experts[victim], locked, registry=registry, seed=0, verify=True)
        log(f"protected {experts[victim]} into {locked} (key id {info['key_id']}, max relative logit error "
            f"{info['verify']['max_rel_error']:.1e})")
    name = f"{prefix}-ta-protected-{victim}"
    swapped = [locked if t == victim else ref for t, ref in experts.items()]
    ran = _merge(registry, name, "task_arithmetic", base, swapped, {}, {"weight": weight}, log, None)
    plain = f"{prefix}-ta"
    rows = [_average({"method": f"task arithmetic, λ {weight}", "model": plain, **measure(registry, plain, tasks)},
                     tasks),
            _row(registry, f"  … with {victim} protected", name, tasks, ran),
            {"method": f"{victim} expert alone", "model": experts[victim],
             **measure(registry, experts[victim], [victim])},
            {"method": f"{victim} expert alone, protected", "model": locked, **measure(registry, locked, [victim])}]
    return {"victim": victim, "rows": rows, "verify": registry.show(locked)["recipe"].get("verify")}


def parity_summary(registry: "Registry", rows: list[dict[str, Any]], prefix: str) -> dict[str, Any] | None:
    """The parity row's disagreement with the experts (the share of prompts whose greedy
    answer differs from the expert's, averaged over tasks) on their reliable prompts and
    on their whole pools, at its start and in the round it kept, from its lineage; and
    its average exact match against task arithmetic's."""
    row = next((r for r in rows if r.get("model") == f"{prefix}-parity-ta"), None)
    if row is None or "not_run" in row:
        return None
    learned = registry.show(row["model"])["recipe"].get("learned") or {}
    table = learned.get("table") or []
    if not table:
        return None
    first, kept = min(r["round"] for r in table), learned.get("kept_round", 0)

    def mean(key: str, at: int) -> float | None:
        values = [r[key] for r in table if r["round"] == at and r.get(key) is not None]
        return sum(values) / len(values) if values else None
    ta = next(r for r in rows if r.get("model") == f"{prefix}-ta")
    # "disagreement": on the reliable prompts (where parity sets come from); "pool_disagreement": on the whole pool
    return {"model": row["model"], "kept_round": kept, "avg": row["avg"], "ta_avg": ta["avg"],
            "disagreement_start": mean("disagreement", first), "disagreement_end": mean("disagreement", kept),
            "pool_disagreement_start": mean("pool_disagreement", first),
            "pool_disagreement_end": mean("pool_disagreement", kept)}


def run_llm(registry: "Registry", *, quick: bool = False, learned: bool = True, protection: bool = True,
            cache: Path | None = None, log: Callable[[str], None] = print, report: Report | None = None) -> LlmTour:
    """The whole LLM tour on ``registry``: build or reuse the cached zoo (``quick``: the
    tiny ``LLM_QUICK`` one, its learned steps cut to a twentieth), register it, merge
    it, protect one expert, measure everything."""
    cfg = LLM_QUICK if quick else LLM_FULL
    prefix = prefix_of(cfg)
    t0, c0 = time.perf_counter(), time.process_time()
    folder, rec = llm_zoo(cfg, cache=cache, log=log)
    with deterministic(LLM_BUILD_THREADS):
        base, experts = register_llm_zoo(registry, cfg, folder, prefix, log)
        tasks = list(experts)
        selected = select_weights(folder, cfg, log)
        table = [{"method": "individual experts", **{t: measure(registry, ref, [t])[t] for t, ref in experts.items()}},
                 {"method": "base", "model": base, **measure(registry, base, tasks)}]
        table = [_average(r, tasks) for r in table]
        table += merge_rows(registry, base, experts, prefix, selected, learned=learned,
                            steps_scale=0.05 if quick else 1.0, log=log, report=report)
        victim = VICTIM if VICTIM in experts else tasks[-1]
        locked = protect_rows(registry, base, experts, prefix, selected["ta"]["weight"], victim, log) \
            if protection else None
        parity = parity_summary(registry, table, prefix)
    return LlmTour(cfg, folder, rec is not None, base, experts, table, locked,
                   round(time.perf_counter() - t0, 1), round(time.process_time() - c0, 1), registry.path, prefix,
                   selected, parity)


__all__ = ["LEARNED", "LlmTour", "PARITY", "STATIC", "VICTIM", "WEIGHTS", "measure", "merge_rows",
           "parity_summary", "protect_rows", "register_llm_zoo", "run_llm", "select_weights"]
