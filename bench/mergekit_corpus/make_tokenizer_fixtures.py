"""Run the tokenizer corpus (tokenizer_cases.py) through mergekit 0.1.5 and store what
it writes as test fixtures under ``tests/data/mergekit_tokenizers/``.

    python bench/mergekit_corpus/make_tokenizer_fixtures.py \
        --mergekit-python /path/to/mergekit-venv/bin/python

Per case: the merged tensors (``CASE.safetensors``), and in ``manifest.json`` the
sha256 of every input file, the recipe's exit status (or last error line),
config.json's ``vocab_size`` and dtype, and the sha256 of each tokenizer file written.
The tokenizer files themselves go to ``CASE.tokenizer/``.

mergekit orders the models it builds a union vocabulary from (and picks the tokenizer
of a recipe without a base) in ``set`` order, which follows the objects' hashes and so
changes from one process to the next. zoo takes them in the recipe's order: base
first, then the models as listed. Each case therefore runs in the first mergekit
process whose order is the recipe's (``attempt`` in the manifest).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tokenizer_cases  # noqa: E402

OUT = HERE.parent.parent / "tests" / "data" / "mergekit_tokenizers"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "added_tokens.json", "tokenizer.model")

# Runs in mergekit's Python. A case runs only where this process's set order is the
# recipe's (the base, then the models as listed); the others are left for another process.
DRIVER = """
import json, sys, yaml
from mergekit.config import MergeConfiguration
from mergekit.merge import run_merge
from mergekit.options import MergeOptions
results = {}
for name, path, out in json.load(open(sys.argv[1])):
    try:
        config = MergeConfiguration.model_validate(yaml.safe_load(open(path)))
        listed = [m.model for m in (config.models or [])]
        refs = config.referenced_models()
        others = [m for m in refs if m != config.base_model]
        if others != [m for m in listed if m != config.base_model] or (config.base_model is None and refs[0] != listed[0]):
            continue
        run_merge(config, out, MergeOptions(copy_tokenizer=True, random_seed=0, quiet=True, lora_merge_cache=sys.argv[3]))
        results[name] = {"rc": 0}
    except BaseException as e:
        line = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        results[name] = {"rc": 1, "error": f"{type(e).__name__}: {line}"[:300]}
json.dump(results, open(sys.argv[2], "w"))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-python", required=True, help="the Python of a venv with mergekit 0.1.5")
    args = ap.parse_args()
    import torch
    from safetensors.torch import load_file, save_file

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    manifest: dict = {"cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "in"
        manifest["inputs"] = tokenizer_cases.build(root)
        manifest["mergekit"] = subprocess.run(
            [args.mergekit_python, "-c", "import importlib.metadata as m; print(m.version('mergekit'), "
             "m.version('torch'), m.version('transformers'), m.version('peft'))"],
            capture_output=True, text=True).stdout.strip()
        configs = []
        for name, case in tokenizer_cases.CASES.items():
            cfg = tmp / f"{name}.yml"
            cfg.write_text(yaml.safe_dump(tokenizer_cases.recipe_for(case, str(root)), sort_keys=False))
            configs.append((name, str(cfg)))
        results: dict = {}
        for attempt in range(40):  # set order follows object addresses: a new process, a new order
            jobs = [(n, c, str(tmp / "out" / n)) for n, c in configs if n not in results]
            if not jobs:
                break
            (tmp / "jobs.json").write_text(json.dumps(jobs))
            subprocess.run([args.mergekit_python, "-c", DRIVER, str(tmp / "jobs.json"), str(tmp / "res.json"),
                            str(tmp / "lora_cache")], check=True, capture_output=True)
            got = json.loads((tmp / "res.json").read_text())
            for name in got:
                got[name]["attempt"] = attempt
            results.update(got)
        for name, _ in configs:
            entry = dict(results.get(name, {"rc": 1, "error": "mergekit never took the recipe's order"}))
            out = tmp / "out" / name
            if entry["rc"] == 0:
                tensors = {}
                for f in sorted(out.glob("*.safetensors")):
                    tensors.update(load_file(str(f)))
                entry["nan"] = any(not bool(torch.isfinite(t).all()) for t in tensors.values())
                target = OUT / f"{name}.safetensors"
                save_file(tensors, str(target), metadata={"format": "pt"})
                config = json.loads((out / "config.json").read_text())
                entry["config"] = {"vocab_size": config.get("vocab_size"),
                                   "dtype": config.get("dtype", config.get("torch_dtype"))}
                entry["tokenizer"] = {}
                for fname in TOKENIZER_FILES:
                    if (out / fname).exists():
                        (OUT / f"{name}.tokenizer").mkdir(exist_ok=True)
                        shutil.copy(out / fname, OUT / f"{name}.tokenizer" / fname)
                        entry["tokenizer"][fname] = hashlib.sha256((out / fname).read_bytes()).hexdigest()
            manifest["cases"][name] = entry
            print(name, entry.get("error", "ok"), flush=True)
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
