"""Generative parity's kept teacher answers on the LLM demo zoo: the same parity recipe
run twice on one registry. The first run decodes each expert's answers to its pool
(greedy and the sampled view) and keeps them as lineage artifacts; the second reads
them back. Measured: each run's annotation seconds (summed over tasks) and learning
seconds, the ratio of the second's annotation to the first's, and whether the two
merges are the same bytes.

    OMP_NUM_THREADS=1 .venv/bin/python bench/llm_teacher_answers.py
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import save  # noqa: E402
from llm_learned import setup  # noqa: E402

NAME = "llm_teacher_answers"
# the demo's parity row (zoo.demo.llm_tour.PARITY), from the weight-averaged task arithmetic
PARAMETERS = {"rounds": 2, "steps": 50, "train": "coefficients,params", "split": "pool", "max_new_tokens": 12}


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None)
    args = ap.parse_args()
    import torch

    import zoo.merge as merge

    torch.set_num_threads(1)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="zoo-llm-teacher-answers-"))
    reg, _, tasks = setup(work)
    models = [{"model": f"llm-{t}"} for t in tasks]
    if not reg.has("ta"):
        merge.run(merge.from_dict({"merge_method": "task_arithmetic", "base_model": "llm-base",
                                   "parameters": {"weight": 0.4}, "models": models}), "ta", registry=reg)
    runs = {}
    for name in ("first", "again"):
        recipe = merge.from_dict({"merge_method": "parity", "base_model": "llm-base",
                                  "parameters": {**PARAMETERS, "start": "ta"}, "models": models})
        merge.run(recipe, name, registry=reg, device="cpu")
        learned = reg.show(name)["recipe"]["learned"]
        runs[name] = {"reused": learned["teacher_answers_reused"], "teacher_seconds": learned["teacher_seconds"],
                      "annotate_seconds": round(sum(learned["teacher_seconds"]), 3),
                      "learn_seconds": learned["seconds"], "weights_sha256": digest(reg.model_dir(name))}
        print(f"{name}: annotate {runs[name]['annotate_seconds']} s of {learned['seconds']} s", file=sys.stderr)
    first, again = runs["first"], runs["again"]
    save(NAME, {"tasks": tasks, "parameters": PARAMETERS,
                "runs": runs, "annotate_ratio": round(again["annotate_seconds"] / first["annotate_seconds"], 4),
                "learn_ratio": round(again["learn_seconds"] / first["learn_seconds"], 4),
                "same_bytes": first["weights_sha256"] == again["weights_sha256"], "torch_threads": 1})


if __name__ == "__main__":
    main()
