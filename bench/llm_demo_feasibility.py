"""Feasibility of the LLM demo zoo: do causal-LM experts of one tiny base interfere?

Builds the LLM demo zoo (``zoo.demo.llm_zoo``) in a fresh cache, timing the build
(wall and CPU seconds), then measures greedy exact match on each task's held-out test
prompts for:

* the base (pre-trained on the mix of all tasks);
* each expert on its own task;
* task arithmetic, theta0 + lambda * sum(tau_i) (arXiv 2212.04089), lambda in 0.1 ... 1.0;
* TIES (arXiv 2306.01708): trim to density 0.2, elect signs, disjoint sum, times lambda;

with lambda chosen on the validation prompts, never on test. The merges are the
project's own in-memory methods (``zoo.merge.state_dicts``).

    .venv/bin/python bench/llm_demo_feasibility.py [--set FIELD=VALUE ...] [--name NAME]

``--set`` overrides a field of the default configuration (for the design iterations);
``--name`` stores the run under that name in the results file's ``tried`` list, and
without ``--set`` the run is also the file's main result.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, save

from zoo.checkpoints.prompts import read_prompts
from zoo.demo.llm_zoo import LLM_FULL, LLM_BUILD_THREADS, exact_match, llm_zoo
from zoo.merge.state_dicts import task_arithmetic, ties

LAMBDAS = [0.05] + [round(0.1 * i, 1) for i in range(1, 11)]
NAME = "llm_demo_feasibility"


def parse_set(cfg, items: list[str]):
    changes = {}
    for item in items:
        k, v = item.split("=", 1)
        if k == "tasks":
            changes[k] = tuple(v.split(","))
        elif k == "base_mix":
            changes[k] = tuple(float(x) for x in v.split(",")) if v else None
        else:
            changes[k] = type(getattr(cfg, k))(v)
    return dataclasses.replace(cfg, **changes)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[], help="FIELD=VALUE override of the default config")
    ap.add_argument("--name", default=None)
    ap.add_argument("--cache", default=None, help="reuse this cache (default: a fresh one, so the build is timed)")
    args = ap.parse_args()
    cfg = parse_set(LLM_FULL, args.set)
    torch.set_num_threads(LLM_BUILD_THREADS)
    cache = Path(args.cache) if args.cache else Path(tempfile.mkdtemp(prefix="zoo-llm-demo-"))

    t0, c0 = time.perf_counter(), time.process_time()
    folder, rec = llm_zoo(cfg, cache=cache)
    build_wall, build_cpu = time.perf_counter() - t0, time.process_time() - c0

    from transformers import LlamaForCausalLM

    tasks = list(cfg.tasks)
    data = {t: {s: read_prompts(folder / "tasks" / t / f"{s}.jsonl") for s in ("val", "test")} for t in tasks}
    model = LlamaForCausalLM.from_pretrained(folder / "base").eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = {t: LlamaForCausalLM.from_pretrained(folder / "experts" / t).state_dict() for t in tasks}
    models = [experts[t] for t in tasks]

    def score(state: dict[str, torch.Tensor], split: str, only: list[str] | None = None) -> dict[str, float]:
        model.load_state_dict(state)
        return {t: 100 * exact_match(model, data[t][split]) for t in (only or tasks)}

    t1, c1 = time.perf_counter(), time.process_time()
    rows: dict[str, dict[str, float]] = {"base": score(base, "test")}
    rows["experts (each on its own task)"] = {t: score(experts[t], "test", [t])[t] for t in tasks}

    def sweep(make) -> tuple[float, dict[str, float], dict[str, float]]:
        val = {lam: score(make(lam), "val") for lam in LAMBDAS}
        avg = {lam: sum(v.values()) / len(v) for lam, v in val.items()}
        best = max(LAMBDAS, key=lambda lam: avg[lam])
        print(f"  val average by λ: {avg}  ({time.perf_counter() - t1:.0f} s into the evaluation)", flush=True)
        return best, score(make(best), "test"), {str(k): round(v, 2) for k, v in avg.items()}

    ta_best, ta_test, ta_val = sweep(lambda lam: task_arithmetic(base, models, weight=lam))
    rows[f"task arithmetic (λ={ta_best} on val)"] = ta_test
    ties_best, ties_test, ties_val = sweep(
        lambda lam: ties(base, models, density=0.2, weight=lam, normalize=False))
    rows[f"TIES d=0.2 (λ={ties_best} on val)"] = ties_test
    rows["weight averaging"] = score(task_arithmetic(base, models, weight=1 / len(tasks)), "test")
    eval_wall, eval_cpu = time.perf_counter() - t1, time.process_time() - c1

    table = {name: {**{t: round(v, 2) for t, v in accs.items()}, "avg": round(sum(accs.values()) / len(accs), 2)}
             for name, accs in rows.items()}
    experts_avg = table["experts (each on its own task)"]["avg"]
    ta_avg = table[f"task arithmetic (λ={ta_best} on val)"]["avg"]
    run = {
        "config": dataclasses.asdict(cfg),
        "overrides": args.set,
        "build_wall_seconds": round(build_wall, 1),
        "build_cpu_seconds": round(build_cpu, 1),
        "build_stage_seconds": rec.seconds if rec else None,
        "build_stage_cpu_seconds": rec.cpu_seconds if rec else None,
        "final_train_loss": {k: round(v, 4) for k, v in rec.final_loss.items()} if rec else None,
        "eval_wall_seconds": round(eval_wall, 1),
        "eval_cpu_seconds": round(eval_cpu, 1),
        "test_exact_match_percent": table,
        "ta_val_avg_by_lambda": ta_val,
        "ties_val_avg_by_lambda": ties_val,
        "experts_minus_ta_points": round(experts_avg - ta_avg, 2),
        "torch_threads": LLM_BUILD_THREADS,
        "parameters": sum(v.numel() for v in base.values()),
    }
    header = "| model | " + " | ".join(tasks) + " | **avg** |"
    print(header)
    print("|" + "---|" * (len(tasks) + 2))
    for name, accs in table.items():
        print(f"| {name} | " + " | ".join(f"{accs[t]:.1f}" if t in accs else "" for t in tasks)
              + f" | **{accs['avg']:.1f}** |")
    print(f"build {build_wall:.0f} s wall, {build_cpu:.0f} s CPU; evaluation {eval_wall:.0f} s wall")

    path = RESULTS / f"{NAME}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    tried = [r for r in old.get("tried", []) if r.get("name") != args.name]
    if args.name:
        tried.append({"name": args.name, **run})
    main_run = run if not args.set and args.name else old.get("result")
    save(NAME, {"result": main_run, "tried": tried})


if __name__ == "__main__":
    main()
