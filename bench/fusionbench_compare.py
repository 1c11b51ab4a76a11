"""Benchmark: zoo's task arithmetic, TIES, TSV-M, Iso-C and Iso-CTS against
FusionBench's own implementations, on the same models, same hyperparameters.

FusionBench 0.2.33 lives in its own virtual environment (never a zoo dependency):

    python3 -m venv VENV
    VENV/bin/python -m pip install torch==2.13.0   # first
    VENV/bin/python -m pip install fusion-bench==0.2.33

Then ``.venv/bin/python bench/fusionbench_compare.py --fusionbench VENV/bin/python``:

1. the models: the classifier demo zoo (a tiny ViT, 8 experts; its bodies, heads
   kept per task) and a synthetic family of awkward shapes (T not dividing the rank,
   wide and tall matrices, biases), 3 experts;
2. hyperparameters for zoo chosen on the demo's validation split (never test): the
   scale of each method over the papers' grid, linspace(0, 3, 31)[1:] with early
   stopping (patience 3) for the SVD methods, 0.1 ... 1.0 for TA and TIES (density
   0.2, dis-sum, one global trim, as FusionBench does);
3. FusionBench (bench/fusionbench_side.py, in its venv) merges with its algorithm
   classes at the defaults and at the chosen values; every merged tensor is compared
   with zoo's (max abs difference; max difference relative to the largest entry of
   FusionBench's merged task vector in that tensor; how many entries differ by more
   than 1e-3 of it);
4. per-task test accuracy of zoo's merges and of FusionBench's merges, evaluated the
   same way (merged body under each expert's own head);
5. why, per weight matrix: how much of each task matrix's energy its top r/T
   singular values hold (what TSV keeps), stable ranks, and the sum's spectrum.

With ``--data-aware``, only RegMean and Fisher merging instead (``data_aware``): zoo's
merges, whose statistics zoo collects on each expert's first 256 train inputs, against
FusionBench's ``regmean_merging`` / ``fisher_merging`` collecting their own statistics
on the same experts and inputs, and against its merge formulas fed zoo's statistics;
RegMean's ratio and Fisher's normalisation chosen on validation; the merged tensors,
per-task test accuracy, and RegMean's least-squares objective and conditioning.

Results go to bench/results/fusionbench_compare.json (``--data-aware`` adds its key
and keeps the rest).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, save
from safetensors.torch import load_file, save_file

from zoo import Registry
from zoo.checkpoints.taskdata import load_split, task_info
from zoo.demo.build import FULL, QUICK, run_demo
from zoo.evaluate import accuracy, load_model
from zoo.merge.methods.spectral import EXCLUDE_DEFAULT
from zoo.merge.state_dicts import merge_state_dicts

HERE = Path(__file__).resolve().parent
SVD_GRID = [round(0.1 * i, 1) for i in range(1, 31)]  # linspace(0, 3, 31)[1:]
TV_GRID = [round(0.1 * i, 1) for i in range(1, 11)]
PATIENCE = 3
TIES = {"density": 0.2}  # with normalize false (dis-sum) and trim global: FusionBench's TIES
DEFAULTS = {"task_arithmetic": 0.3, "ties": 0.3, "tsv": 1.0, "iso_c": 1.0, "iso_cts": 1.0}



def run_fusionbench(python: str, fdir: Path, jobs: list[dict]) -> dict:
    """FusionBench's side of the comparison (``fusionbench_side.py``, in its own venv's
    ``python``) over ``fdir``'s models.safetensors: the jobs' merges and what it reports."""
    (fdir / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.run([python, str(HERE / "fusionbench_side.py"), str(fdir / "models.safetensors"),
                           str(fdir / "jobs.json"), str(fdir)], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode:
        sys.exit(f"FusionBench failed:\n{proc.stderr[-4000:]}")
    return json.loads((fdir / "fusionbench.json").read_text())

def zoo_merge(method: str, base: dict, experts: list[dict], scale: float) -> dict[str, torch.Tensor]:
    """zoo's merge at ``scale`` (TA/TIES: each model's weight; TSV: alpha; Iso: scaling_factor)."""
    if method == "task_arithmetic":
        return merge_state_dicts(method, base, experts, [{"weight": scale}] * len(experts))
    if method == "ties":
        return merge_state_dicts(method, base, experts, [{"weight": scale, **TIES}] * len(experts),
                                 normalize=False, trim="global")
    key = "alpha" if method == "tsv" else "scaling_factor"
    return merge_state_dicts(method, base, experts, **{key: scale})


def fb_job(job_id: str, method: str, scale: float, exclude: list[str]) -> dict:
    """The same merge in FusionBench's own parameter names."""
    params = {"task_arithmetic": {"scaling_factor": scale},
              "ties": {"scaling_factor": scale, "threshold": int(TIES["density"] * 100), "remove_keys": [],
                       "merge_func": "sum"},
              "tsv": {"alpha": scale, "exclude_keys": exclude},
              "iso_c": {"scaling_factor": scale, "exclude_keys": exclude},
              "iso_cts": {"scaling_factor": scale, "common_space_fraction": 0.8, "exclude_keys": exclude}}[method]
    return {"id": job_id, "method": method, "params": params}


def compare(zoo: dict, fb: dict, base: dict) -> dict:
    """Max abs difference over every tensor, and max difference relative to the largest
    entry of FusionBench's merged task vector in that tensor; the worst tensor's name."""
    worst_abs = worst_rel = 0.0
    where, differing, total = None, 0, 0
    for name, b in base.items():
        z, f = zoo[name].double(), fb[name].double()
        scale = max(float((f - b.double()).abs().max()), 1e-30)
        d = float((z - f).abs().max())
        rel = d / scale
        differing += int(((z - f).abs() > 1e-3 * scale).sum())
        total += b.numel()
        worst_abs = max(worst_abs, d)
        if rel > worst_rel:
            worst_rel, where = rel, name
    return {"max_abs_diff": worst_abs, "max_rel_diff": worst_rel, "worst_tensor": where, "tensors": len(base),
            "entries_differing_over_1e-3_rel": differing, "entries": total}


def synthetic_family(t: int = 3) -> tuple[dict, list[dict]]:
    """Shapes that exercise the edges: r not divisible by T (zero slots in TSV), wide and
    tall matrices, a square one, biases and a norm."""
    g = torch.Generator().manual_seed(0)
    shapes = {"a.weight": (25, 14), "a.bias": (25,), "b.weight": (7, 50), "c.weight": (30, 30),
              "c.norm": (30,), "d.weight": (64, 48)}
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    shared = {k: 0.02 * torch.randn(s, generator=g) for k, s in shapes.items()}
    experts = [{k: v + shared[k] + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}
               for _ in range(t)]
    return base, experts


def spectra(base: dict, experts: list[dict]) -> dict:
    """Per 2-D matrix: the share of each task matrix's energy (sum of sigma^2) in its top
    k = r/T values (what TSV keeps), its stable rank (||.||_F^2 / sigma_1^2), the sum's
    stable rank and the share of the sum's nuclear norm in its top k directions."""
    rows = {}
    t = len(experts)
    for name, b in base.items():
        if b.dim() != 2:
            continue
        r = min(b.shape)
        k = int(r * (1 / t))
        kept, stable = [], []
        for e in experts:
            s = torch.linalg.svdvals((e[name] - b).double())
            kept.append(float((s[:k] ** 2).sum() / (s ** 2).sum()))
            stable.append(float((s ** 2).sum() / s[0] ** 2))
        s_sum = torch.linalg.svdvals(sum(e[name] - b for e in experts).double())
        rows[name] = {"rank": r, "k_per_task": k, "task_energy_in_top_k": sum(kept) / t,
                      "task_stable_rank": sum(stable) / t, "sum_stable_rank": float((s_sum ** 2).sum() / s_sum[0] ** 2),
                      "sum_sigma_max_over_mean": float(s_sum[0] / s_sum.mean())}
    avg = {k: sum(r[k] for r in rows.values()) / len(rows) for k in
           ("task_energy_in_top_k", "task_stable_rank", "sum_stable_rank", "sum_sigma_max_over_mean")}
    return {"mean": avg, "matrices": rows}


REGMEAN_GRID = [0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 1.0]  # reduce_non_diagonal_ratio, chosen on validation
DATA_DEFAULTS = {"regmean": {"reduce_non_diagonal_ratio": 0.1, "num_regmean_examples": 256},
                 "fisher": {"normalize_fisher_weight": True, "minimal_fisher_weight": 1e-6,
                            "num_fisher_examples": 256}}


def least_squares(merged: dict, flat: dict, stats: dict, t: int, ratio: float) -> dict:
    """What RegMean minimises, per linear weight: sum_i tr((W - W_i) G~_i (W - W_i)^T)
    with the shrunk per-token Grams, for the merged W (float64); and the condition
    number of sum_i G~_i, which decides how well a float32 inverse can find it."""
    out = {}
    for key in sorted({k.split("/", 1)[1] for k in stats}):
        grams = [stats[f"e{i}/{key}"].double() for i in range(t)]
        grams = [g * ratio + torch.diag(g.diagonal() * (1 - ratio)) for g in grams]
        w = merged[key].double()
        f = sum(float(torch.trace((w - flat[f"e{i}/{key}"].double()) @ g @ (w - flat[f"e{i}/{key}"].double()).T))
                for i, g in enumerate(grams))
        out[key] = {"objective": f, "condition_number": float(torch.linalg.cond(sum(grams)))}
    objective = sum(v["objective"] for v in out.values())
    return {"objective_sum": objective, "max_condition_number": max(v["condition_number"] for v in out.values()),
            "per_tensor": out}


def data_aware(args, reg: Registry, res, tasks: list[str], base: dict, body: list[str], evaluate, work: Path) -> None:
    """RegMean and Fisher: zoo's merges (statistics collected by zoo, stored on the
    experts), against FusionBench's ``regmean_merging`` / ``fisher_merging`` collecting
    their own statistics with their own hooks on the same experts and the same inputs,
    and against FusionBench's merge formulas fed zoo's statistics."""
    import zoo.merge as merge
    from zoo.merge.learned.runtime import build_body

    experts = [res.experts[t] for t in tasks]
    # the checkpoint's tensor names -> the module's (transformers 5 renames ViT's on load)
    to_module = build_body(reg.checkpoint(res.base), torch.device("cpu")).to_module

    def zoo_run(method: str, params: dict, name: str) -> tuple[dict[str, torch.Tensor], dict]:
        recipe = merge.from_dict({"merge_method": method, "base_model": res.base, "parameters": params,
                                  "models": [{"model": e} for e in experts]})
        t0 = time.perf_counter()
        merge.run(recipe, name, registry=reg, device="cpu")
        seconds = time.perf_counter() - t0
        folder = reg.model_dir(name)
        sd = {k: v for f in sorted(folder.glob("model*.safetensors")) for k, v in load_file(str(f)).items()}
        sd = {to_module.get(k, k): v for k, v in sd.items()}
        return {k: sd[k].float() for k in body}, {**reg.show(name)["recipe"]["statistics"], "seconds": seconds}

    # hyperparameters on validation: RegMean's ratio over a grid, Fisher's normalisation on or off
    sweeps: dict[str, dict[str, float]] = {"regmean": {}, "fisher": {}}
    merges, records = {}, {}
    for r in REGMEAN_GRID:
        key = f"regmean@{r}"
        merges[key], records[key] = zoo_run("regmean", {"reduce_non_diagonal_ratio": r}, f"rm-{r}")
        sweeps["regmean"][str(r)] = evaluate(merges[key], "val")["avg"]
        print(f"{key}: val {sweeps['regmean'][str(r)]:.1f} ({records[key]['seconds']:.1f} s)", flush=True)
    for norm in (True, False):
        key = f"fisher@normalize={str(norm).lower()}"
        merges[key], records[key] = zoo_run("fisher", {"normalize_fisher_weight": norm}, f"fm-{norm}")
        sweeps["fisher"][str(norm).lower()] = evaluate(merges[key], "val")["avg"]
        print(f"{key}: val {sweeps['fisher'][str(norm).lower()]:.1f} ({records[key]['seconds']:.1f} s)", flush=True)
    ratio = max(REGMEAN_GRID, key=lambda r: (sweeps["regmean"][str(r)], -abs(r - 0.1)))
    norm = sweeps["fisher"]["true"] >= sweeps["fisher"]["false"]
    chosen = {"regmean": {**DATA_DEFAULTS["regmean"], "reduce_non_diagonal_ratio": ratio},
              "fisher": {**DATA_DEFAULTS["fisher"], "normalize_fisher_weight": norm}}

    # FusionBench's side: the experts as Hugging Face folders, their first 256 train inputs
    fdir = work / "data-aware"
    fdir.mkdir()
    flat = {f"base/{k}": v.contiguous() for k, v in base.items()}
    for i, e in enumerate(experts):
        sd = load_model(reg, e).state_dict()
        flat.update({f"e{i}/{k}": sd[k].float().contiguous() for k in body})
    save_file(flat, str(fdir / "models.safetensors"))
    data = {f"e{i}": load_split(reg.task_data(t), "train")[0][:256].contiguous() for i, t in enumerate(tasks)}
    save_file(data, str(fdir / "data.safetensors"))
    folders = [str(reg.model_dir(e)) for e in experts]
    jobs, zoo_keys, all_stats = [], {}, {}
    for method, settings in (("regmean", [DATA_DEFAULTS["regmean"], chosen["regmean"]]),
                             ("fisher", [DATA_DEFAULTS["fisher"], chosen["fisher"]])):
        for params in {json.dumps(p, sort_keys=True): p for p in settings}.values():
            key = (f"regmean@{params['reduce_non_diagonal_ratio']}" if method == "regmean"
                   else f"fisher@normalize={str(params['normalize_fisher_weight']).lower()}")
            stats = {}
            for i, (e, entry) in enumerate(zip(experts, records[key]["experts"])):
                stats.update({f"e{i}/{to_module.get(k, k)}": v
                              for k, v in load_file(str(reg.artifact(e, entry["artifact"]))).items()})
            save_file(stats, str(fdir / f"{key}.stats.safetensors"))
            all_stats[key] = stats
            for source in ("own", "given"):
                job_id = f"{key}:{source}"
                zoo_keys[job_id] = key
                jobs.append({"id": job_id, "method": method, "params": params, "statistics": source,
                             "experts": folders, "data": str(fdir / "data.safetensors"),
                             "stats": str(fdir / f"{key}.stats.safetensors")})
    fb_info = run_fusionbench(args.fusionbench, fdir, jobs)
    comparisons, rows, conditioning = {}, {}, {}
    for job in jobs:
        key = zoo_keys[job["id"]]
        fb = load_file(str(fdir / f"{job['id']}.safetensors"))
        comparisons[f"demo/{job['id']}"] = compare(merges[key], fb, base)
        if job["statistics"] == "own":
            rows[f"{key} (FusionBench, its own statistics)"] = evaluate(fb, "test")
        else:
            rows[f"{key} (FusionBench's formula on zoo's statistics)"] = evaluate(fb, "test")
        rows.setdefault(f"{key} (zoo)", evaluate(merges[key], "test"))
        if job["method"] == "regmean":
            conditioning.setdefault(key, {"zoo": least_squares(merges[key], flat, all_stats[key], len(experts),
                                                               job["params"]["reduce_non_diagonal_ratio"])})
            conditioning[key][f"fusionbench {job['statistics']} statistics"] = least_squares(
                fb, flat, all_stats[key], len(experts), job["params"]["reduce_non_diagonal_ratio"])

    name = "fusionbench_compare" + ("_quick" if args.quick else "")  # a quick run never overwrites the full one
    out = RESULTS / f"{name}.json"
    result = json.loads(out.read_text()) if out.exists() else {}
    result.pop("machine", None)
    result.pop("date", None)
    result["data_aware"] = {
        "fusionbench": fb_info, "tasks": tasks, "defaults": DATA_DEFAULTS, "chosen_on_val": chosen,
        "regmean_grid": REGMEAN_GRID, "val_sweeps_avg_percent": sweeps,
        "examples_per_expert": 256, "batch_size": 32, "split": "train (the first 256 examples, in order)",
        "test_accuracy_percent": rows, "tensor_comparison": comparisons, "regmean_least_squares": conditioning,
        "zoo_statistics": {k: {kk: vv for kk, vv in v.items() if kk != "tensors"} | {"tensors": {
            kk: vv for kk, vv in v["tensors"].items() if kk != "mean_tensors"}} for k, v in records.items()},
    }
    save(name, result)
    print("| method | " + " | ".join(tasks) + " | **avg** |")
    for name, accs in rows.items():
        print(f"| {name} | " + " | ".join(f"{accs[t]:.1f}" for t in tasks) + f" | **{accs['avg']:.1f}** |")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fusionbench", required=True, help="python of FusionBench's venv")
    ap.add_argument("--cache", default=None, help="demo cache (default: the user's)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--data-aware", action="store_true",
                    help="only RegMean and Fisher; their results join the saved JSON's other methods")
    args = ap.parse_args()
    # one thread, both sides: on a shared 2-core machine two threads contending for busy
    # cores make each small SVD 20x slower; the results do not depend on it
    torch.set_num_threads(1)
    cfg = QUICK if args.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="zoo-fb-compare-"))
    reg = Registry(work / "registry.db", create=True)
    res = run_demo(reg, cfg, log=lambda *_: None, cache=Path(args.cache) if args.cache else None)
    tasks = list(cfg.tasks)
    base_all = load_model(reg, res.base).state_dict()
    models = {t: load_model(reg, res.experts[t]) for t in tasks}
    states = {t: m.state_dict() for t, m in models.items()}
    body = [k for k in base_all if not k.startswith("classifier.")]
    base = {k: base_all[k].float() for k in body}
    experts = [{k: states[t][k].float() for k in body} for t in tasks]
    data = {}
    for t in tasks:
        path = reg.task_data(t)
        data[t] = {s: load_split(path, s) for s in ("val", "test")}
        data[t]["input"] = task_info(path)["input"]

    def evaluate(merged: dict | None, split: str) -> dict[str, float]:
        out = {}
        for t in tasks:
            sd = dict(states[t])
            if merged is not None:
                sd.update({k: merged[k] for k in body})
            probe = type(models[t])(models[t].config)
            probe.load_state_dict(sd)
            probe.eval()
            x, y = data[t][split]
            out[t] = 100 * accuracy(probe, x, y, data[t]["input"])
        out["avg"] = sum(out[t] for t in tasks) / len(tasks)
        return out

    if args.data_aware:
        return data_aware(args, reg, res, tasks, base, body, evaluate, work)

    # 2. hyperparameters on validation: merges are base + scale * delta, so one merge
    # at scale 1 gives every point of the sweep
    chosen, sweeps, timing = {}, {}, {}
    for method, grid in (("task_arithmetic", TV_GRID), ("ties", TV_GRID), ("tsv", SVD_GRID), ("iso_c", SVD_GRID),
                         ("iso_cts", SVD_GRID)):
        t0 = time.perf_counter()
        unit = zoo_merge(method, base, experts, 1.0)
        timing[method] = time.perf_counter() - t0
        delta = {k: unit[k] - base[k] for k in body}
        sweep, best, since = {}, None, 0
        for s in grid:
            sweep[s] = evaluate({k: base[k] + s * delta[k] for k in body}, "val")["avg"]
            if best is None or sweep[s] > sweep[best]:
                best, since = s, 0
            else:
                since += 1
                if method in ("tsv", "iso_c", "iso_cts") and since >= PATIENCE:
                    break
        chosen[method], sweeps[method] = best, sweep
        print(f"{method}: best scale on val {best} ({sweep[best]:.1f}); merge {timing[method]:.1f} s", flush=True)

    # 3. FusionBench on the same models: defaults and the chosen values
    exclude = [k for k in body if base[k].dim() == 2 and re.search(EXCLUDE_DEFAULT, k)]
    syn_base, syn_experts = synthetic_family()
    syn_exclude: list[str] = []
    zoo_merges, comparisons, fb_info = {}, {}, {}
    for family, (b, es, exc) in {"demo": (base, experts, exclude), "synthetic": (syn_base, syn_experts, syn_exclude)
                                 }.items():
        flat = {f"base/{k}": v.contiguous() for k, v in b.items()}
        for i, e in enumerate(es):
            flat.update({f"e{i}/{k}": v.contiguous() for k, v in e.items()})
        fdir = work / family
        fdir.mkdir()
        save_file(flat, str(fdir / "models.safetensors"))
        settings = {m: sorted({DEFAULTS[m], chosen[m]}) if family == "demo" else [DEFAULTS[m]] for m in DEFAULTS}
        jobs = [fb_job(f"{m}@{s}", m, s, exc) for m, ss in settings.items() for s in ss]
        fb_info[family] = run_fusionbench(args.fusionbench, fdir, jobs)
        for job in jobs:
            m, s = job["id"].split("@")
            z = zoo_merge(m, b, es, float(s))
            f = load_file(str(fdir / f"{job['id']}.safetensors"))
            comparisons[f"{family}/{job['id']}"] = compare(z, f, b)
            if family == "demo" and float(s) == chosen[m]:
                zoo_merges[m] = (z, f)

    # 4. test accuracy, zoo's and FusionBench's, at the values chosen on validation
    rows = {"individual experts": evaluate(None, "test"), "base + expert heads": evaluate(base, "test")}
    for m, (z, f) in zoo_merges.items():
        rows[f"{m} (scale {chosen[m]}, zoo)"] = evaluate(z, "test")
        rows[f"{m} (scale {chosen[m]}, FusionBench)"] = evaluate(f, "test")
    for m in ("tsv", "iso_c", "iso_cts"):  # the papers'/FusionBench's fixed defaults, for reference
        if chosen[m] != DEFAULTS[m]:
            rows[f"{m} (scale {DEFAULTS[m]}, zoo)"] = evaluate(zoo_merge(m, base, experts, DEFAULTS[m]), "test")

    result = {
        "config": "quick" if args.quick else "full", "tasks": tasks,
        "fusionbench": fb_info["demo"],
        "hyperparameters": {"chosen_on_val": chosen, "defaults": DEFAULTS, "ties": {**TIES, "normalize": False,
                                                                                    "trim": "global"},
                            "iso_cts_common_space_fraction": 0.8, "exclude_keys": exclude},
        "val_sweeps_avg_percent": {m: {str(k): v for k, v in s.items()} for m, s in sweeps.items()},
        "test_accuracy_percent": rows,
        "tensor_comparison": comparisons,
        "zoo_merge_seconds_at_scale_1": timing,
        "spectra": spectra(base, experts),
    }
    save("fusionbench_compare" + ("_quick" if args.quick else ""), result)
    print("| method | " + " | ".join(tasks) + " | **avg** |")
    print("|" + "---|" * (len(tasks) + 2))
    for name, accs in rows.items():
        print(f"| {name} | " + " | ".join(f"{accs[t]:.1f}" for t in tasks) + f" | **{accs['avg']:.1f}** |")


if __name__ == "__main__":
    main()
