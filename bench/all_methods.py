"""Every merge method on the classifier demo zoo, in one table: the experts, task
arithmetic, TIES, the SVD merges (TSV-M, Iso-C, Iso-CTS), the data-aware merges
(RegMean, Fisher), the learned ones (AdaMerging layer-wise and Concrete TA, label-free
entropy), and parity distillation from task arithmetic and from the best data-free
method.

    .venv/bin/python bench/all_methods.py [--only KEY,...]

On a loaded machine the rows can run in parallel processes, each into its own result
file, with the scales an earlier sweep chose, and be combined afterwards:

    .venv/bin/python bench/all_methods.py --only parity-ta --scales task_arithmetic=0.3,tsv=1.3 \
        --best tsv --result all_methods_part1
    .venv/bin/python bench/all_methods.py --combine all_methods_part1,...

Every row is a registered ``zoo merge`` of the demo's 8 experts, measured by
``zoo eval`` (the merged body under each expert's own head) on the **test** split.
Hyperparameters come from the validation split, never test, on this very build of the
demo: the scales of TA, TIES, TSV-M, Iso-C and Iso-CTS are swept here as
bench/fusionbench_compare.py sweeps them (the same grids and early stopping);
RegMean's ``reduce_non_diagonal_ratio`` and Fisher's ``normalize_fisher_weight`` are
the ones ``fusionbench_compare.py --data-aware`` chose on validation (read from
bench/results/fusionbench_compare.json). The best data-free method, where parity
starts, is the one with the best validation average. The learned rows use bench/parity_demo.py's budget (300 AdaMerging and 100 Concrete TA
steps of lr 1e-2; parity 3 rounds of 100 steps, coefficients trained), run here again
on the same zoo. Results: bench/results/all_methods.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import RESULTS, save  # noqa: E402

import torch  # noqa: E402

import zoo.merge as merge  # noqa: E402
from zoo import Registry  # noqa: E402
from zoo.demo.build import FULL, run_demo  # noqa: E402
from zoo.demo.merges import LEARNED, measure  # noqa: E402

DATA_FREE = ("task_arithmetic", "ties", "tsv", "iso_c", "iso_cts")
LABEL = {"task_arithmetic": "task arithmetic", "ties": "TIES", "tsv": "TSV-M", "iso_c": "Iso-C",
         "iso_cts": "Iso-CTS"}
PARITY = {"rounds": 3, "steps": 100, "lr": 1e-2}  # bench/parity_demo.py's default schedule
BUDGET = {"steps": 300, "batch_size": 32, "lr": 1e-2, "objective": "entropy"}  # parity_demo's AdaMerging


def data_free_spec(method: str, scale: float) -> tuple[dict, dict]:
    """(global parameters, per-model parameters) of a data-free merge at ``scale``, as
    bench/fusionbench_compare.py runs it."""
    if method == "task_arithmetic":
        return {}, {"weight": scale}
    if method == "ties":  # FusionBench's TIES: density 0.2, dis-sum, one global trim
        return {"normalize": False, "trim": "global"}, {"weight": scale, "density": 0.2}
    return {("alpha" if method == "tsv" else "scaling_factor"): scale}, {}


def sweeps(reg: Registry, demo, tasks: list[str]) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Each data-free method's scale chosen on validation, and the validation averages:
    merges are base + scale * delta, so one merge at scale 1 gives every point."""
    from fusionbench_compare import PATIENCE, SVD_GRID, TV_GRID, zoo_merge

    from zoo.checkpoints.taskdata import load_split, task_info
    from zoo.evaluate import accuracy, load_model

    base_all = load_model(reg, demo.base).state_dict()
    models = {t: load_model(reg, demo.experts[t]) for t in tasks}
    states = {t: m.state_dict() for t, m in models.items()}
    body = [k for k in base_all if not k.startswith("classifier.")]
    base = {k: base_all[k].float() for k in body}
    experts = [{k: states[t][k].float() for k in body} for t in tasks]
    val = {t: (*load_split(reg.task_data(t), "val"), task_info(reg.task_data(t))["input"]) for t in tasks}

    def avg(merged: dict) -> float:
        out = 0.0
        for t in tasks:
            probe = type(models[t])(models[t].config)
            probe.load_state_dict({**states[t], **merged})
            probe.eval()
            out += 100 * accuracy(probe, *val[t])
        return out / len(tasks)

    chosen, curves = {}, {}
    for method in DATA_FREE:
        grid = TV_GRID if method in ("task_arithmetic", "ties") else SVD_GRID
        unit = zoo_merge(method, base, experts, 1.0)
        delta = {k: unit[k] - base[k] for k in body}
        curve, best, since = {}, None, 0
        for s in grid:
            curve[s] = avg({k: base[k] + s * delta[k] for k in body})
            if best is None or curve[s] > curve[best]:
                best, since = s, 0
            else:
                since += 1
                if grid is SVD_GRID and since >= PATIENCE:
                    break
        chosen[method], curves[method] = best, {str(k): v for k, v in curve.items()}
        print(f"{method}: scale {best} on val ({curve[best]:.1f})", file=sys.stderr, flush=True)
    return chosen, curves


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", default=None, help="comma-separated row keys")
    ap.add_argument("--scales", default=None, help="METHOD=SCALE,...: an earlier sweep's choices (no sweep)")
    ap.add_argument("--best", default=None, help="with --scales: the best data-free method on validation")
    ap.add_argument("--val", default=None, help="with --scales: METHOD=VAL_AVG,... the sweep's validation averages")
    ap.add_argument("--result", default="all_methods")
    ap.add_argument("--parity-schedule", default="3x100", help="ROUNDSxSTEPS (default: parity_demo's 3x100)")
    ap.add_argument("--combine", default=None, help="result files whose rows join all_methods.json")
    args = ap.parse_args()
    if args.combine:
        return combine(args.combine.split(","))
    torch.set_num_threads(2)
    compared = json.loads((RESULTS / "fusionbench_compare.json").read_text())
    data = compared["data_aware"]["chosen_on_val"]

    work = Path(tempfile.mkdtemp(prefix="zoo-all-methods-"))
    reg = Registry(work / "registry.db", create=True)
    demo = run_demo(reg, FULL, log=lambda m: print(m, file=sys.stderr))
    tasks, experts = list(demo.experts), list(demo.experts.values())
    if args.scales:
        chosen = {k: float(v) for k, v in (x.split("=") for x in args.scales.split(","))}
        chosen = {m: chosen.get(m, 1.0) for m in DATA_FREE}
        curves, best = {}, args.best or "tsv"
        val = {k: float(v) for k, v in (x.split("=") for x in args.val.split(","))} if args.val else {}
    else:
        chosen, curves = sweeps(reg, demo, tasks)
        val = {m: curves[m][str(chosen[m])] for m in DATA_FREE}
        best = max(DATA_FREE, key=lambda m: val[m])

    specs: list[tuple[str, str, str, dict, dict]] = []  # key, label, method, global, per-model
    # what RegMean and Fisher reduce to with uniform statistics: the plain mean of the weights
    specs.append(("average", "weight averaging (task arithmetic, weight 1/8)", "task_arithmetic", {},
                  {"weight": 1 / len(FULL.tasks)}))
    for m in DATA_FREE:
        g, p = data_free_spec(m, chosen[m])
        specs.append((m, f"{LABEL[m]} ({chosen[m]})", m, g, p))
    specs.append(("regmean", f"RegMean (ratio {data['regmean']['reduce_non_diagonal_ratio']})", "regmean",
                  {"reduce_non_diagonal_ratio": data["regmean"]["reduce_non_diagonal_ratio"]}, {}))
    specs.append(("fisher", f"Fisher (normalized: {str(data['fisher']['normalize_fisher_weight']).lower()})",
                  "fisher", {"normalize_fisher_weight": data["fisher"]["normalize_fisher_weight"]}, {}))
    specs.append(("adamerging", "AdaMerging layer-wise, entropy", "adamerging", {**BUDGET, "coefficients": "layer"},
                  {}))
    specs.append(("concrete_ta", "Concrete TA, entropy", "concrete_ta",
                  LEARNED["concrete-ta-entropy"]["parameters"], {}))
    rounds, steps = (int(x) for x in args.parity_schedule.split("x"))
    parity = {**PARITY, "rounds": rounds, "steps": steps}
    specs.append(("parity-ta", "parity from task arithmetic", "parity", {**parity, "start": "all-task_arithmetic"}, {}))
    specs.append((f"parity-{best}", f"parity from {LABEL[best]} (the best data-free on validation)", "parity",
                  {**parity, "start": f"all-{best}"}, {}))
    only = set(args.only.split(",")) if args.only else None
    # a parity row needs its start merge registered first
    needed = set(DATA_FREE) if only is None else \
        {"task_arithmetic" if k == "parity-ta" else k.removeprefix("parity-") for k in only if k.startswith("parity-")}

    rows = [{"key": "experts", "method": "individual experts", **{t: demo.accuracy[t] for t in tasks}}]
    rows[0]["avg"] = sum(rows[0][t] for t in tasks) / len(tasks)
    for key, label, method, params, model_params in specs:
        if only is not None and key not in only and key not in needed:
            continue
        recipe = merge.from_dict({"merge_method": method, "base_model": demo.base, "parameters": params,
                                  "models": [{"model": e, "parameters": model_params} for e in experts]})
        t0 = time.perf_counter()
        name = f"all-{key}"  # not a method's name, so parity's start finds this registered merge
        merge.run(recipe, name, registry=reg, device="cpu", log=lambda m: print(m, file=sys.stderr))
        if only is not None and key not in only:
            continue  # registered only as a parity start
        row = {"key": key, "method": label, "merge_method": method, "parameters": params,
               "model_parameters": model_params, "wall_s": round(time.perf_counter() - t0, 1),
               **measure(reg, name, tasks)}
        row["avg"] = sum(row[t] for t in tasks) / len(tasks)
        if method in DATA_FREE and method in val:
            row["val_avg_percent"] = val[method]
        rows.append(row)
        print(f"{key}: {100 * row['avg']:.1f} ({row['wall_s']:.0f} s)", file=sys.stderr, flush=True)
        save(args.result, {"tasks": tasks, "val_avg_percent": val, "demo_cache": demo.cache.name, "chosen_on_val": chosen,
                           "val_sweeps_avg_percent": curves, "best_data_free_on_val": best,
                           "scales_given": bool(args.scales),
                           "data_aware_hyperparameters": "fusionbench_compare.py --data-aware, chosen on val",
                           "rows": rows})
    table(tasks, rows)


ORDER = ["experts", "task_arithmetic", "ties", "tsv", "iso_c", "iso_cts", "average", "regmean", "fisher", "adamerging",
         "concrete_ta", "parity-ta"]


def combine(names: list[str]) -> None:
    """The rows of ``names`` join all_methods.json (the sweep's file); each must come
    from the same demo build and the scales that sweep chose."""
    main = json.loads((RESULTS / "all_methods.json").read_text())
    done = {r["key"]: r for r in main["rows"]}
    for name in names:
        part = json.loads((RESULTS / f"{name}.json").read_text())
        if part["demo_cache"] != main["demo_cache"]:
            sys.exit(f"{name} ran on another demo build ({part['demo_cache']})")
        for m, s in part["chosen_on_val"].items():
            if s != main["chosen_on_val"][m] and (m == part["best_data_free_on_val"] or m == "task_arithmetic"):
                sys.exit(f"{name} started parity from {m} at {s}, the sweep chose {main['chosen_on_val'][m]}")
        if part["best_data_free_on_val"] != main["best_data_free_on_val"]:
            sys.exit(f"{name} started parity from {part['best_data_free_on_val']}, not the best on validation")
        done.update({r["key"]: r for r in part["rows"] if r["key"] != "experts"})
    keys = [k for k in ORDER if k in done] + sorted(k for k in done if k not in ORDER)
    main["rows"] = [done[k] for k in keys]
    main["combined_from"] = names
    main.pop("machine", None)
    main.pop("date", None)
    save("all_methods", main)
    table(main["tasks"], main["rows"])


def table(tasks: list[str], rows: list[dict]) -> None:
    print("\n| method | " + " | ".join(tasks) + " | **avg** |")
    print("|" + "---|" * (len(tasks) + 2))
    for r in rows:
        print(f"| {r['method']} | " + " | ".join(f"{100 * r[t]:.1f}" for t in tasks) + f" | **{100 * r['avg']:.1f}** |")


if __name__ == "__main__":
    main()
