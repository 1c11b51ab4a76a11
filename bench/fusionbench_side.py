"""FusionBench's side of bench/fusionbench_compare.py: run under FusionBench's own
virtual environment (never zoo's), it merges the models with FusionBench's algorithm
classes and writes each merged state dict back. It imports nothing from zoo.

    FB_PYTHON bench/fusionbench_side.py MODELS.safetensors JOBS.json OUT_DIR

MODELS holds ``base/<name>`` and ``e<i>/<name>`` tensors; JOBS is a list of
``{"id", "method", "params"}`` with method one of task_arithmetic, ties, tsv, iso_c,
iso_cts and params FusionBench's own keyword arguments.
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
