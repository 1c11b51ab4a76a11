"""Parity distillation for generative experts on the LLM demo zoo: label-free parity
from task arithmetic against task arithmetic and the experts, in exact match.

Builds (or reuses) the LLM demo zoo (``zoo.demo.llm_zoo``, ``LLM_FULL``), registers its
base, experts and tasks (pool / val / test prompt splits) in a fresh registry, and runs
the ``parity`` merge method from task arithmetic at the λ the feasibility study chose on
val (``bench/results/llm_demo_feasibility.json``). The parity run reads only the pool's
prompts (never their answers); each round it measures exact match on ``--eval-split``
(val while choosing hyperparameters). Then, outside the run, every model is measured
on test (greedy exact match per task) and against the experts on their pools (the share
of pool prompts whose greedy answer differs from the expert's, on all of them and on the
prompts where the expert is reliable by the run's own rule).

Cost: wall and CPU seconds, steps per second, and the peak resident (anonymous) memory of
this process during the run, on one torch thread per core given.

    .venv/bin/python bench/llm_parity.py [--set KEY=VALUE ...] [--name NAME] [--threads N]

``--set`` overrides a parity parameter; ``--name`` stores the run under ``tried`` in the
results file, and ``--main`` makes it the file's main result.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import torch
from common import RESULTS, grown_pool, save

import zoo.merge as merge
from zoo.checkpoints.prompts import read_prompts, write_task_prompts
from zoo.demo.llm_zoo import LLM_FULL, llm_zoo
from zoo.registry import Registry
from zoo.textgen import TextCodec, generate, same_answer

NAME = "llm_parity"
DEFAULTS = {"start": "task_arithmetic", "train": "coefficients", "rounds": 3, "steps": 100}


class PeakRss:
    """The peak anonymous resident memory of this process while it runs (sampled)."""

    def __init__(self, every: float = 0.02):
        self.every, self.peak, self.stop = every, 0, threading.Event()

    @staticmethod
    def now() -> int:
        with open("/proc/self/status") as f:
            return next(int(x.split()[1]) for x in f if x.startswith("RssAnon:")) * 1024

    def __enter__(self):
        self.before = self.peak = self.now()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        while not self.stop.wait(self.every):
            self.peak = max(self.peak, self.now())

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()
        self.peak = max(self.peak, self.now())


def answers(model_dir: Path, prompts, codec: TextCodec, max_new_tokens: int = 16) -> list[str]:
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    gens = generate(lambda b: model(input_ids=b["input_ids"]).logits, [codec.prompt_ids(p) for p in prompts],
                    codec.eos_id, max_new_tokens, batch_size=256, context=codec.context)
    return [codec.decode(g.tokens) for g in gens]


def exact(got: list[str], rows) -> float:
    return 100 * sum(same_answer(a, r.answer) for a, r in zip(got, rows)) / len(rows)


def differ(a: list[str], b: list[str]) -> float:
    return 100 * sum(not same_answer(x, y) for x, y in zip(a, b)) / len(a)


TAUS = [0.5, 0.6, 0.7, 0.8, 0.9, 0.95]


def reliability(folder: Path, tasks: list[str], data, codec: TextCodec, temperature: float = 1.0) -> dict:
    """How the reliability rule sorts each expert's answers on val (its references are
    used here only to choose tau): per tau, the share of prompts kept and the exact match
    of the kept answers, with and without the sampled second view."""
    from transformers import LlamaForCausalLM

    out = {}
    for t in tasks:
        model = LlamaForCausalLM.from_pretrained(folder / "experts" / t).eval()
        fn = lambda b: model(input_ids=b["input_ids"]).logits  # noqa: E731
        ids = [codec.prompt_ids(p) for p in data[t]["val"]]
        greedy = generate(fn, ids, codec.eos_id, 16, context=codec.context)
        sampled = generate(fn, ids, codec.eos_id, 16, temperature=temperature, context=codec.context,
                           generator=torch.Generator().manual_seed(0))
        right = [same_answer(codec.decode(g.tokens), p.answer) for g, p in zip(greedy, data[t]["val"])]
        stable = [g.tokens == x.tokens for g, x in zip(greedy, sampled)]
        row = {"expert_exact_match": round(100 * sum(right) / len(right), 2)}
        for tau in TAUS:
            for view in ("confidence", "confidence+sample"):
                keep = [g.ended and g.confidence >= tau and (st or view == "confidence")
                        for g, st in zip(greedy, stable)]
                n = sum(keep)
                row[f"{view}@{tau}"] = {"kept": round(100 * n / len(keep), 1),
                                        "right": round(100 * sum(r for r, k in zip(right, keep) if k) / n, 1)
                                        if n else None}
        out[t] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE parity parameter (JSON values)")
    ap.add_argument("--name", default=None)
    ap.add_argument("--main", action="store_true", help="make this run the results file's main result")
    ap.add_argument("--eval-split", default="val", help="measured each round (val while tuning)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reliability", action="store_true", help="only measure the reliability rule on val")
    ap.add_argument("--pool-size", type=int, default=None,
                    help="grow each task's unlabeled pool to this many prompts: fresh seeded prompts of the "
                         "task, none of them a val or test prompt, without their answers")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    params = dict(DEFAULTS)
    for item in args.set:
        k, v = item.split("=", 1)
        try:
            params[k] = json.loads(v)
        except json.JSONDecodeError:
            params[k] = v
    params["eval_split"] = args.eval_split

    folder, _ = llm_zoo(LLM_FULL)
    tasks = list(LLM_FULL.tasks)
    feas = json.loads((RESULTS / "llm_demo_feasibility.json").read_text())["result"]
    lam = float(next(k for k in feas["test_exact_match_percent"] if k.startswith("task arithmetic"))
                .split("λ=")[1].split(" ")[0])
    codec = TextCodec.from_folder(folder / "base", context=LLM_FULL.context)
    data = {t: {s: read_prompts(folder / "tasks" / t / f"{s}.jsonl") for s in ("pool", "val", "test")} for t in tasks}
    if args.pool_size:
        for t in tasks:
            data[t]["pool"] = grown_pool(t, data[t], args.pool_size)

    if args.reliability:
        path = RESULTS / f"{NAME}.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        old["reliability_on_val"] = reliability(folder, tasks, data, codec)
        print(json.dumps(old["reliability_on_val"], indent=1))
        save(NAME, old)
        return

    tmp = Path(tempfile.mkdtemp(prefix="zoo-llm-parity-"))
    reg = Registry(tmp / "registry.db", create=True)
    reg.add(folder / "base", "base", "base")
    for t in tasks:
        write_task_prompts(tmp / f"{t}.jsonl", data[t])
        reg.add_task(t, data=tmp / f"{t}.jsonl")
        reg.add(folder / "experts" / t, t, "expert", base="base", tasks=[t])
    ta_recipe = {"merge_method": "task_arithmetic", "base_model": "base",
                 "models": [{"model": t, "parameters": {"weight": lam}} for t in tasks]}
    merge.run(merge.from_dict(ta_recipe), "ta", registry=reg)

    # the experts' own greedy answers on their pools and on test
    expert_pool = {t: answers(folder / "experts" / t, data[t]["pool"], codec) for t in tasks}
    expert_test = {t: exact(answers(folder / "experts" / t, data[t]["test"], codec), data[t]["test"]) for t in tasks}

    recipe = {"merge_method": "parity", "base_model": "base", "seed": 0,
              "models": [{"model": t, "parameters": {"weight": lam}} for t in tasks], "parameters": params}
    c0 = time.process_time()
    with PeakRss() as mem:
        t0 = time.perf_counter()
        info = merge.run(merge.from_dict(recipe), "parity", registry=reg)
        wall = time.perf_counter() - t0
    cpu = time.process_time() - c0
    learned = reg.show("parity")["recipe"]["learned"]
    rows = info["parity"]

    def measure(name: str) -> dict:
        folder_m = reg.model_dir(name)
        test = {t: exact(answers(folder_m, data[t]["test"], codec), data[t]["test"]) for t in tasks}
        pool = {t: differ(answers(folder_m, data[t]["pool"], codec), expert_pool[t]) for t in tasks}
        return {"test_exact_match": test, "test_avg": sum(test.values()) / len(tasks),
                "pool_disagreement": pool, "pool_disagreement_avg": sum(pool.values()) / len(tasks)}

    ta, par = measure("ta"), measure("parity")
    kept = [r for r in rows if r["kept"]]
    start = [r for r in rows if r["round"] == 0]
    by_round = {}
    for r in rows:
        by_round.setdefault(r["round"], []).append(r)
    rounds = {str(k): {"reliable_disagreement": round(100 * sum(x["disagreement"] for x in v) / len(v), 2),
                       "pool_disagreement": round(100 * sum(x["pool_disagreement"] for x in v) / len(v), 2),
                       f"{args.eval_split}_exact_match": round(100 * sum(x["exact_match"] or 0 for x in v) / len(v),
                                                               2)}
              for k, v in by_round.items()}
    experts_avg = sum(expert_test.values()) / len(tasks)
    run = {
        "parameters": params, "ta_lambda": lam, "pool_size": len(data[tasks[0]]["pool"]),
        "test_exact_match_percent": {
            "experts (each on its own task)": {**{t: round(v, 2) for t, v in expert_test.items()},
                                               "avg": round(experts_avg, 2)},
            f"task arithmetic (λ={lam})": {**{t: round(v, 2) for t, v in ta["test_exact_match"].items()},
                                            "avg": round(ta["test_avg"], 2)},
            "parity from task arithmetic (label-free)": {
                **{t: round(v, 2) for t, v in par["test_exact_match"].items()}, "avg": round(par["test_avg"], 2)}},
        "pool_disagreement_with_experts_percent": {
            "task arithmetic": {**{t: round(v, 2) for t, v in ta["pool_disagreement"].items()},
                                "avg": round(ta["pool_disagreement_avg"], 2)},
            "parity": {**{t: round(v, 2) for t, v in par["pool_disagreement"].items()},
                       "avg": round(par["pool_disagreement_avg"], 2)}},
        "reliable_prompts": {r["task"]: r["reliable"] for r in start},
        "reliable_disagreement_percent": {"start": round(100 * sum(r["disagreement"] for r in start) / len(start), 2),
                                          "kept": round(100 * sum(r["disagreement"] for r in kept) / len(kept), 2)},
        "by_round": rounds, "kept_round": learned["kept_round"],
        "parity_minus_ta_points": round(par["test_avg"] - ta["test_avg"], 2),
        "pool_disagreement_ratio": round(par["pool_disagreement_avg"] / max(ta["pool_disagreement_avg"], 1e-9), 3),
        "cost": {"wall_seconds": round(wall, 1), "cpu_seconds": round(cpu, 1), "steps": learned["steps"],
                 "distill_seconds": learned["seconds"],
                 "steps_per_second": round(learned["steps"] / learned["seconds"], 2) if learned["seconds"] else None,
                 "peak_anon_mib": round(mem.peak / 2**20, 1),
                 "peak_increase_mib": round((mem.peak - mem.before) / 2**20, 1), "torch_threads": args.threads},
    }
    print(json.dumps(run, indent=2))
    path = RESULTS / f"{NAME}.json"
    old = json.loads(path.read_text()) if path.is_file() else {}
    tried = [r for r in old.get("tried", []) if r.get("name") != args.name]
    if args.name:
        tried.append({"name": args.name, **run})
    old.pop("machine", None)
    old.pop("date", None)
    save(NAME, {**old, "result": run if args.main else old.get("result"), "tried": tried})
    reg.close()


if __name__ == "__main__":
    main()
