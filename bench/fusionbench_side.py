"""FusionBench's side of bench/fusionbench_compare.py: run under FusionBench's own
virtual environment (never zoo's), it merges the models with FusionBench's algorithm
classes and writes each merged state dict back. It imports nothing from zoo.

    FB_PYTHON bench/fusionbench_side.py MODELS.safetensors JOBS.json OUT_DIR

MODELS holds ``base/<name>`` and ``e<i>/<name>`` tensors; JOBS is a list of
``{"id", "method", "params"}`` with method one of task_arithmetic, ties, tsv, iso_c,
iso_cts and params FusionBench's own keyword arguments.

The data-aware jobs (method regmean or fisher) also say where the statistics come from:

- ``"statistics": "own"``: FusionBench collects them with its own hooks and merges, in
  its functions ``regmean_merging`` and ``fisher_merging``, on the experts loaded with
  transformers from ``experts`` (Hugging Face folders, task heads included) and each
  expert's unlabeled inputs in ``data`` (``e<i>``: pixel values, in order). Those
  functions ask a Hugging Face ``Trainer`` for batches; ``Feeder`` hands them the same
  batches of 32 zoo runs, in order;
- ``"statistics": "given"``: zoo's statistics (``stats``: ``e<i>/<tensor>``) go into
  FusionBench's ``merging_with_regmean_weights`` / ``merging_with_fisher_weights``, so
  only the merge formula is compared.
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn


def module_from(state: dict[str, torch.Tensor]) -> nn.Module:
    """A module whose state_dict() is ``state``: nested modules along the dotted names."""
    root = nn.Module()
    for name, t in state.items():
        *path, leaf = name.split(".")
        m = root
        for p in path:
            if p not in m._modules:
                m.add_module(p, nn.Module())
            m = m._modules[p]
        m.register_parameter(leaf, nn.Parameter(t.clone(), requires_grad=False))
    return root


class Feeder:
    """What FusionBench's regmean_merging and fisher_merging ask of a Trainer: batches
    of an expert's inputs, in order, and the batch size."""

    def __init__(self, x: torch.Tensor, batch_size: int):
        self.x, self._train_batch_size = x, batch_size

    def get_train_dataloader(self):
        return [{"pixel_values": self.x[s:s + self._train_batch_size]}
                for s in range(0, len(self.x), self._train_batch_size)]

    def _prepare_inputs(self, inputs):
        return inputs


HEAD = r"classifier\..*"  # each expert keeps its own head; FusionBench's regex excludes it (re.match)


def data_aware(job: dict, groups: dict[str, dict[str, torch.Tensor]], experts: list[str],
               tmp: Path) -> dict[str, torch.Tensor]:
    """A RegMean or Fisher merge by FusionBench's functions: the merged body, named as
    the transformers module names its parameters (as MODELS and the statistics are)."""
    from fusion_bench.method.fisher_merging.fisher_merging import fisher_merging, merging_with_fisher_weights
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights, regmean_merging

    p = job["params"]
    t = len(experts)
    if job["statistics"] == "given":
        stats = load_file(job["stats"])
        names = [n for n in groups["base"]]
        per = [{k.split("/", 1)[1]: v for k, v in stats.items() if k.startswith(f"{g}/")} for g in experts]
        if job["method"] == "regmean":
            params = {n: [groups[g][n] for g in experts] for n in names}
            grams = [{n[:-len(".weight")]: v for n, v in st.items()} for st in per]
            return merging_with_regmean_weights(params, grams, p["reduce_non_diagonal_ratio"], weight_transpose=True)
        weighted = [n for n in names if n in per[0]]
        params = {n: [groups[g][n] for g in experts] for n in weighted}
        merged = merging_with_fisher_weights(params, per, torch.ones(t) / t, p["normalize_fisher_weight"],
                                             p["minimal_fisher_weight"])
        for n in names:  # no Fisher (a buffer): the mean, as zoo
            if n not in merged:
                merged[n] = torch.stack([groups[g][n] for g in experts]).mean(0)
        return merged
    from transformers import AutoModelForImageClassification

    models = [AutoModelForImageClassification.from_pretrained(f).eval() for f in job["experts"]]
    data = load_file(job["data"])
    feeders = [Feeder(data[f"e{i}"], 32) for i in range(t)]
    if job["method"] == "regmean":
        merged = regmean_merging(models, feeders, [HEAD], [p["num_regmean_examples"]] * t,
                                 p["reduce_non_diagonal_ratio"])
    else:
        merged = fisher_merging(models, feeders, [HEAD], [p["num_fisher_examples"]] * t,
                                normalize_fisher_weight=p["normalize_fisher_weight"],
                                minimal_fisher_weight=p["minimal_fisher_weight"])
    return {k: v.detach() for k, v in merged.items() if k in groups["base"]}  # named as the module names them


def main() -> None:
    models, jobs, out = Path(sys.argv[1]), json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3])
    from fusion_bench import BaseModelPool
    from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm
    from fusion_bench.method.isotropic_merging import ISO_C_Merge, ISO_CTS_Merge
    from fusion_bench.method.task_singular_vector import TaskSingularVectorMerging

    flat = load_file(str(models))
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        g, name = key.split("/", 1)
        groups.setdefault(g, {})[name] = t
    experts = sorted((g for g in groups if g != "base"), key=lambda g: int(g[1:]))
    classes = {"task_arithmetic": TaskArithmeticAlgorithm, "ties": TiesMergingAlgorithm,
               "tsv": TaskSingularVectorMerging, "iso_c": ISO_C_Merge, "iso_cts": ISO_CTS_Merge}
    timings = {}
    for job in jobs:
        if job["method"] in ("regmean", "fisher"):
            t0 = time.perf_counter()
            merged_sd = data_aware(job, groups, experts, out)
            timings[job["id"]] = time.perf_counter() - t0
            save_file({k: v.detach().contiguous() for k, v in merged_sd.items()}, str(out / f"{job['id']}.safetensors"))
            continue
        pool = BaseModelPool({"_pretrained_": module_from(groups["base"]),
                              **{g: module_from(groups[g]) for g in experts}})
        algo = classes[job["method"]](**job["params"])
        t0 = time.perf_counter()
        merged = algo.run(pool)
        timings[job["id"]] = time.perf_counter() - t0
        save_file({k: v.detach().contiguous() for k, v in merged.state_dict().items()},
                  str(out / f"{job['id']}.safetensors"))
    (out / "fusionbench.json").write_text(json.dumps({"version": version("fusion-bench"), "torch": torch.__version__,
                                                    "seconds": timings}))


if __name__ == "__main__":
    main()
