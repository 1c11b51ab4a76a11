"""Learned merges on the LLM demo zoo: greedy exact match per task (test) for AdaMerging
(layer-wise) and Concrete TA, each with the label-free ``entropy`` objective and the
supervised ``ce`` objective, against the base, the experts and task arithmetic (λ
chosen on the validation prompts); and the cost of each learned merge on this machine.

The zoo is ``zoo.demo.llm_zoo`` (LLM_FULL, cached). Each task is registered with its
pool, val and test prompts in one file; the learned merges run through ``zoo.merge``
with the methods' own defaults (``--set`` overrides one, for the study), each in its
own process, so its wall time, CPU seconds and peak memory are its own. ``entropy``
learns from the pool's prompts (answers never read); ``ce`` from the val split's
reference answers. Test answers are read only to score.

    .venv/bin/python bench/llm_learned.py [--only KEY,...] [--set KEY:PARAM=VALUE ...] [--result NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, grown_pool, run_measured, save  # noqa: E402

NAME = "llm_learned"
LAMBDAS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]
# key -> (method, parameters): the methods' defaults, one objective each
RUNS = {
    "adamerging-entropy": ("adamerging", {"objective": "entropy"}),
    "adamerging-ce": ("adamerging", {"objective": "ce"}),
    "concrete_ta-entropy": ("concrete_ta", {"objective": "entropy"}),
    "concrete_ta-ce": ("concrete_ta", {"objective": "ce"}),
    "concrete_adamerging-ce": ("concrete_adamerging", {"objective": "ce"}),
}
LABELS = {
    "adamerging-entropy": "AdaMerging, layer-wise, entropy (label-free)",
    "adamerging-ce": "AdaMerging, layer-wise, ce (supervised, val answers)",
    "concrete_ta-entropy": "Concrete TA, entropy (label-free)",
    "concrete_ta-ce": "Concrete TA, ce (supervised, val answers)",
    "concrete_adamerging-ce": "Concrete AdaMerging, ce (supervised, val answers)",
}


def setup(work: Path, train_size: int | None = None):
    """The cached zoo, registered: base, one expert per task, each task with its splits.
    With ``train_size``, each task's pool grows to that many prompts with answers (fresh,
    seeded, never a val or test prompt): more labelled data for ``ce`` with ``split: pool``."""
    from zoo import Registry
    from zoo.checkpoints.prompts import read_prompts, write_task_prompts
    from zoo.demo.llm_zoo import LLM_FULL, llm_zoo

    folder, _ = llm_zoo(LLM_FULL, log=lambda m: print(m, file=sys.stderr))
    tasks = list(LLM_FULL.tasks)
    db = work / "registry.db"
    new = not db.exists()
    reg = Registry(db, create=True)
    if new:
        reg.add(folder / "base", "llm-base", "base")
        for t in tasks:
            data = work / f"{t}.jsonl"
            splits = {s: read_prompts(folder / "tasks" / t / f"{s}.jsonl") for s in ("pool", "val", "test")}
            if train_size:
                splits["pool"] = grown_pool(t, splits, train_size, labelled=True)
            write_task_prompts(data, splits)
            reg.add_task(t, data=data)
            reg.add(folder / "experts" / t, f"llm-{t}", tasks=[t], base="llm-base")
    return reg, folder, tasks


def one(work: Path, key: str, name: str, params: dict) -> None:
    """Child process: run one learned merge into the work registry."""
    import zoo.merge as merge

    reg, _, tasks = setup(work)
    method, _ = RUNS[key]
    recipe = merge.from_dict({"merge_method": method, "base_model": "llm-base", "parameters": params,
                              "models": [{"model": f"llm-{t}"} for t in tasks]})
    merge.run(recipe, name, registry=reg, device="cpu")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma-separated run keys")
    ap.add_argument("--set", action="append", default=[], help="KEY:PARAM=VALUE, a parameter of one run")
    ap.add_argument("--result", default=NAME)
    ap.add_argument("--work", default=None)
    ap.add_argument("--skip-baselines", action="store_true", help="no base, experts or task arithmetic rows")
    ap.add_argument("--collect", default=None, help="comma-separated result names: their rows into --result")
    ap.add_argument("--train-size", type=int, default=None,
                    help="grow each task's pool to this many prompts with answers (a new --work registry)")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    ap.add_argument("--name", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="zoo-llm-learned-"))
    if args.one:
        one(work, args.one, args.name or args.one, json.loads(args.params))
        return
    if args.collect:
        collect(args.collect.split(","), args.result)
        return

    import torch
    from transformers import LlamaForCausalLM

    from zoo.checkpoints.prompts import read_prompts
    from zoo.demo.llm_zoo import exact_match
    from zoo.merge.state_dicts import task_arithmetic

    reg, folder, tasks = setup(work, args.train_size)
    pool_size = len(read_prompts(reg.task_data(tasks[0]), split="pool"))  # what ce with split: pool learns from
    data = {t: {s: read_prompts(folder / "tasks" / t / f"{s}.jsonl") for s in ("val", "test")} for t in tasks}
    model = LlamaForCausalLM.from_pretrained(folder / "base").eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = {t: LlamaForCausalLM.from_pretrained(folder / "experts" / t).state_dict() for t in tasks}

    def score(state, split: str, only=None) -> dict[str, float]:
        model.load_state_dict(state)
        return {t: round(100 * exact_match(model, data[t][split]), 2) for t in (only or tasks)}

    def row(label: str, accs: dict[str, float], **extra) -> dict:
        return {"method": label, **accs, "avg": round(sum(accs[t] for t in tasks) / len(tasks), 2), **extra}

    path = RESULTS / f"{args.result}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    rows = {r["key"]: r for r in old.get("rows", [])}
    if not args.skip_baselines and ("ta" not in rows or args.only is None):
        rows["base"] = {"key": "base", **row("base", score(base, "test"))}
        rows["experts"] = {"key": "experts", **row("experts (each on its own task)",
                                                   {t: score(experts[t], "test", [t])[t] for t in tasks})}
        val = {lam: score(task_arithmetic(base, list(experts.values()), weight=lam), "val") for lam in LAMBDAS}
        avg = {lam: sum(v.values()) / len(v) for lam, v in val.items()}
        best = max(LAMBDAS, key=lambda lam: avg[lam])
        rows["ta"] = {"key": "ta", **row(f"task arithmetic (λ={best} on val)",
                                         score(task_arithmetic(base, list(experts.values()), weight=best), "test"),
                                         val_avg_by_lambda={str(k): round(v, 2) for k, v in avg.items()})}
        print(f"TA val by λ {avg}", file=sys.stderr, flush=True)

    overrides: dict[str, dict] = {}
    for item in args.set:
        key, kv = item.split(":", 1)
        k, v = kv.split("=", 1)
        try:
            value = json.loads(v)
        except json.JSONDecodeError:  # a bare word: a string
            value = v
        overrides.setdefault(key, {})[k] = value
    keys = args.only.split(",") if args.only else list(RUNS)
    for key in keys:
        method, params = RUNS[key]
        params = {**params, **overrides.get(key, {})}
        name = key if not overrides.get(key) else key + "-" + "-".join(f"{k}{v}" for k, v in overrides[key].items())
        name += f"-train{args.train_size}" if args.train_size else ""
        c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        measured = run_measured([sys.executable, __file__, "--work", str(work), "--one", key, "--name", name,
                                 "--params", json.dumps(params)])
        c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        learned = reg.show(name)["recipe"]["learned"]
        merged = LlamaForCausalLM.from_pretrained(reg.model_dir(name)).state_dict()
        cost = {"steps": learned["steps"], "learn_seconds": learned["seconds"],
                "steps_per_second": round(learned["steps"] / learned["seconds"], 2),
                "process_wall_s": round(measured["wall_s"], 1),
                "process_cpu_s": round((c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime), 1),
                "peak_anon_mib": round(measured["peak_anon_mib"], 1), "torch_threads": torch.get_num_threads()}
        if "refreshes" in learned:
            cost["refreshes"] = learned["refreshes"]
        val_accs = score(merged, "val")
        rows[name] = {"key": name, **row(LABELS[key] + (f" {overrides[key]}" if overrides.get(key) else ""),
                                         score(merged, "test"), merge_method=method, parameters=params,
                                         pool_size=pool_size,
                                         val_avg=round(sum(val_accs.values()) / len(tasks), 2), cost=cost)}
        print(f"{name}: test avg {rows[name]['avg']:.1f}, val avg {rows[name]['val_avg']:.1f}, "
              f"{cost['steps_per_second']} steps/s, {cost['peak_anon_mib']} MiB", file=sys.stderr, flush=True)
        save(args.result, {"tasks": tasks, "rows": list(rows.values()),
                           "target": "ce learned merge >= task arithmetic + 8 points (avg exact match)"})
    ordered = list(rows.values())
    print("\n| method | " + " | ".join(tasks) + " | avg |")
    for r in ordered:
        print(f"| {r['method']} | " + " | ".join(f"{r[t]:.1f}" for t in tasks) + f" | {r['avg']:.1f} |")
    save(args.result, {"tasks": tasks, "rows": ordered,
                       "target": "ce learned merge >= task arithmetic + 8 points (avg exact match)"})


def collect(names: list[str], result: str) -> None:
    """Rows of several runs (e.g. run side by side on a busy machine) in one results file."""
    rows: dict[str, dict] = {}
    tasks = None
    for name in names:
        part = json.loads((RESULTS / f"{name}.json").read_text())
        tasks = tasks or part["tasks"]
        rows.update({r["key"]: r for r in part["rows"]})
    order = ["base", "experts", "ta"]
    ordered = [rows[k] for k in order if k in rows] + [r for k, r in rows.items() if k not in order]
    save(result, {"tasks": tasks, "rows": ordered, "parts": names,
                  "target": "ce learned merge >= task arithmetic + 8 points (avg exact match)"})


if __name__ == "__main__":
    main()
