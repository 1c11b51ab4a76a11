"""Every data-free structural merge and the two data-aware merges on the LLM demo zoo:
greedy exact match per task (test) for TSV-M (``tsv``), Iso-C (``iso_c``), Iso-CTS
(``iso_cts``), RegMean (``regmean``) and Fisher (``fisher``), next to the experts and
task arithmetic, and why (the spectra of the task matrices).

The zoo is ``zoo.demo.llm_zoo`` (LLM_FULL, cached), registered as bench/llm_learned.py
registers it (each task with its pool, val and test prompts). Every merge is an ordinary
``zoo.merge`` run into that registry. The data-free merges are linear in their final
scale (theta_0 + scale * M), so each is merged once at scale 1 and its scale chosen on
the **val** prompts over a short grid (patience: the sweep stops after 2 points without
a better val average); test is read only to score the chosen scale. RegMean and Fisher
run at their defaults; they read each expert's registered task: where one fails on a
causal LM its one-line error is recorded, and the same pool prompts are given to it
again as a text file per expert (``models[].parameters.data``). Results: bench/results/llm_all_methods.json.

    OMP_NUM_THREADS=1 .venv/bin/python bench/llm_all_methods.py
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402

NAME = "llm_all_methods"
TA_GRID = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]  # bench/llm_learned.py's
SVD_GRID = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0]
PATIENCE = 2
DATA_FREE = {"task_arithmetic": TA_GRID, "tsv": SVD_GRID, "iso_c": SVD_GRID, "iso_cts": SVD_GRID}
LABEL = {"task_arithmetic": "task arithmetic", "tsv": "TSV-M", "iso_c": "Iso-C", "iso_cts": "Iso-CTS",
         "regmean": "RegMean", "fisher": "Fisher"}


def main() -> None:
    import torch
    from llm_learned import setup
    from transformers import LlamaForCausalLM

    import zoo.merge as merge
    from zoo.checkpoints.prompts import read_prompts
    from zoo.demo.llm_zoo import exact_match
    from zoo.merge.methods.spectral import EXCLUDE_DEFAULT

    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="zoo-llm-all-"))
    reg, folder, tasks = setup(work)
    data = {t: {s: read_prompts(folder / "tasks" / t / f"{s}.jsonl") for s in ("val", "test")} for t in tasks}
    model = LlamaForCausalLM.from_pretrained(folder / "base").eval()
    base = {k: v.clone() for k, v in model.state_dict().items()}
    experts = {t: LlamaForCausalLM.from_pretrained(folder / "experts" / t).state_dict() for t in tasks}
    result: dict = {"tasks": tasks, "torch_threads": torch.get_num_threads(), "rows": [], "failed": []}

    def score(state, split: str, only=None) -> dict[str, float]:
        model.load_state_dict(state)
        return {t: round(100 * exact_match(model, data[t][split]), 2) for t in (only or tasks)}

    def row(key: str, label: str, accs: dict[str, float], **extra) -> dict:
        return {"key": key, "method": label, **accs, "avg": round(sum(accs[t] for t in tasks) / len(tasks), 2),
                **extra}

    def recipe(method: str, params: dict, model_params: dict | None = None):
        return merge.from_dict({"merge_method": method, "base_model": "llm-base", "parameters": params,
                                "models": [{"model": f"llm-{t}", "parameters": model_params or {}} for t in tasks]})

    def run(name: str, method: str, params: dict, model_params: dict | None = None) -> tuple[dict, float]:
        t0 = time.perf_counter()
        merge.run(recipe(method, params, model_params), name, registry=reg, device="cpu")
        seconds = time.perf_counter() - t0
        return LlamaForCausalLM.from_pretrained(reg.model_dir(name)).state_dict(), seconds

    def keep(r: dict) -> None:
        result["rows"].append(r)
        print(f"{r['key']}: test avg {r['avg']:.1f}", file=sys.stderr, flush=True)
        save(NAME, result)

    keep(row("experts", "experts (each on its own task)", {t: score(experts[t], "test", [t])[t] for t in tasks}))

    # a diagnostic beside the defaults: TSV-M and Iso-C with every 2-D tensor SVD'd (the
    # embeddings and lm_head too, as FusionBench), not given task arithmetic at scale / T
    runs = [(m, m, {}, g, "") for m, g in DATA_FREE.items()] + \
        [(f"{m}-svd-all", m, {"exclude_keys": "$^"}, SVD_GRID, ", exclude_keys $^ (every 2-D tensor SVD'd)")
         for m in ("tsv", "iso_c")]
    for key, method, params, grid, note in runs:
        # task arithmetic's weight is per model; the SVD merges' scale is global
        unit, seconds = (run(f"all-{key}", method, {}, {"weight": 1.0}) if method == "task_arithmetic"
                         else run(f"all-{key}", method, params))
        delta = {k: unit[k] - base[k] for k in base}
        curve, best, since = {}, None, 0
        for s in grid:
            accs = score({k: base[k] + s * delta[k] for k in base}, "val")
            curve[s] = round(sum(accs.values()) / len(tasks), 2)
            print(f"  {key} {s}: val {curve[s]:.1f}", file=sys.stderr, flush=True)
            if best is None or curve[s] > curve[best]:
                best, since = s, 0
            else:
                since += 1
                if since >= PATIENCE:
                    break
        scale_name = {"task_arithmetic": "weight", "tsv": "alpha"}.get(method, "scaling_factor")
        keep(row(key, f"{LABEL[method]} ({scale_name} {best}, on val{note})",
                 score({k: base[k] + best * delta[k] for k in base}, "test"), merge_method=method, parameters=params,
                 scale=best, scale_name=scale_name, val_avg_by_scale={str(k): v for k, v in curve.items()},
                 val_avg=curve[best], merge_wall_s_at_scale_1=round(seconds, 2)))

    # RegMean and Fisher: their defaults on the registered tasks; where that fails, the
    # same pool prompts given per expert as a text file (models[].parameters.data)
    texts = {}
    for t in tasks:
        texts[t] = work / f"{t}-pool-texts.jsonl"
        texts[t].write_text("".join(json.dumps({"text": p.prompt}) + "\n"
                                    for p in read_prompts(folder / "tasks" / t / "pool.jsonl")))
    for method in ("regmean", "fisher"):
        for variant in ("registered", "data-file"):
            name = f"all-{method}" + ("" if variant == "registered" else "-data-file")
            try:
                t0 = time.perf_counter()
                models = [{"model": f"llm-{t}", "parameters": {} if variant == "registered" else
                           {"data": str(texts[t])}} for t in tasks]
                merge.run(merge.from_dict({"merge_method": method, "base_model": "llm-base", "parameters": {},
                                           "models": models}), name, registry=reg, device="cpu")
                seconds = time.perf_counter() - t0
                merged = LlamaForCausalLM.from_pretrained(reg.model_dir(name)).state_dict()
            except Exception as e:  # a one-line record of why, as the brief for this table asks
                line = " ".join(f"{type(e).__name__}: {e}".split())[:300].replace(str(work), "WORK")
                result["failed"].append({"method": method, "variant": variant, "error": line})
                print(f"{method} {variant}: FAILED {line}", file=sys.stderr, flush=True)
                save(NAME, result)
                continue
            val = score(merged, "val")
            keep(row(name.removeprefix("all-"), f"{LABEL[method]} (defaults, {variant})",
                     score(merged, "test"), merge_method=method, variant=variant,
                     val_avg=round(sum(val.values()) / len(tasks), 2), merge_wall_s=round(seconds, 2)))
            break  # the registered run worked: no further variant

    # why: the spectra of the matrices the SVD merges SVD (not the embeddings, lm_head)
    from fusionbench_compare import spectra
    mats = [k for k, v in base.items() if v.dim() == 2 and not re.search(EXCLUDE_DEFAULT, k)]
    sp = spectra({k: base[k] for k in mats}, [{k: experts[t][k] for k in mats} for t in tasks])
    result["spectra"] = sp
    sp["mean"]["top_k_left_subspace_overlap"], sp["mean"]["overlap_if_random"] = overlap(base, experts, mats)
    # what the SVD merges leave to task arithmetic at alpha / T: the rest of the task vectors
    energy = {k: sum(float(((experts[t][k] - base[k]).double() ** 2).sum()) for t in tasks) for k in base}
    sp["mean"]["task_vector_energy_outside_svd"] = 1 - sum(energy[k] for k in mats) / sum(energy.values())
    shapes = sorted({tuple(base[k].shape) for k in mats})
    result["matrix_shapes"] = [list(s) for s in shapes]
    print("spectra:", json.dumps(sp["mean"]), file=sys.stderr, flush=True)
    save(NAME, result)

    print("\n| method | " + " | ".join(tasks) + " | **avg** |")
    print("|" + "---|" * (len(tasks) + 2))
    for r in result["rows"]:
        print(f"| {r['method']} | " + " | ".join(f"{r[t]:.1f}" for t in tasks) + f" | **{r['avg']:.1f}** |")
    for f in result["failed"]:
        print(f"FAILED {f['method']} ({f['variant']}): {f['error']}")


def overlap(base: dict, experts: dict, mats: list[str]) -> tuple[float, float]:
    """How much the tasks' top-k left singular subspaces (k = r / T, what TSV keeps)
    share, averaged over matrices and task pairs: ||U_i^T U_j||_F^2 / k, 1 for the same
    subspace; k / r for random ones."""
    import torch

    tasks = list(experts)
    out, rand = [], []
    for name in mats:
        r = min(base[name].shape)
        k = int(r / len(tasks))
        us = [torch.linalg.svd((experts[t][name] - base[name]).double(), full_matrices=False)[0][:, :k]
              for t in tasks]
        pairs = [(i, j) for i in range(len(us)) for j in range(i + 1, len(us))]
        out.append(sum(float((us[i].T @ us[j]).pow(2).sum()) / k for i, j in pairs) / len(pairs))
        rand.append(k / base[name].shape[0])
    return sum(out) / len(out), sum(rand) / len(rand)


if __name__ == "__main__":
    main()
