"""Run the parity corpus through mergekit and store what it writes as test fixtures.

    python bench/mergekit_corpus/make_fixtures.py --mergekit /path/to/venv/bin/mergekit-yaml

Builds the tiny inputs (inputs.py) in a temporary folder, runs every recipe of
cases.py through ``mergekit-yaml`` (0.1.5, with its ``--copy-tokenizer`` default), and
writes under ``tests/data/mergekit/``: each case's merged tensors as
``CASE.safetensors`` (as mergekit wrote them) and ``manifest.json``, which holds the
sha256 of every input file (so the test knows the fixture belongs to the inputs it
rebuilds), each recipe, and what mergekit did: its exit status and last error line,
the dtype its ``config.json`` names, its tokenizer's vocabulary and settings, and
whether it wrote NaN. CI has no mergekit: tests/test_mergekit_parity.py reads these.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import inputs  # noqa: E402
import cases  # noqa: E402
import method_cases  # noqa: E402
import slice_cases  # noqa: E402
from cases import recipe_for  # noqa: E402

# each corpus: its recipes, where its fixtures go, and its input models' number of layers
CORPORA = {"issue18": (cases.CASES, HERE.parent.parent / "tests" / "data" / "mergekit", inputs.LAYERS),
           "methods": (method_cases.CASES, HERE.parent.parent / "tests" / "data" / "mergekit_methods", inputs.LAYERS),
           "slices": (slice_cases.CASES, HERE.parent.parent / "tests" / "data" / "mergekit_slices",
                      slice_cases.LAYERS)}


def tokenizer_summary(folder: Path) -> dict | None:
    """What a merge's tokenizer says: its vocabulary (token -> id) and its settings' limit."""
    if not (folder / "tokenizer.json").exists():
        return None
    data = json.loads((folder / "tokenizer.json").read_text())
    vocab = dict(data["model"]["vocab"])
    for tok in data.get("added_tokens") or []:
        vocab[tok["content"]] = tok["id"]
    cfg = json.loads((folder / "tokenizer_config.json").read_text()) if (folder / "tokenizer_config.json").exists() \
        else {}
    return {"vocab_sha256": hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest(),
            "model_max_length": cfg.get("model_max_length")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit", required=True, help="the mergekit-yaml executable (mergekit 0.1.5)")
    ap.add_argument("--only", nargs="*", help="run only these cases (the manifest keeps the others)")
    ap.add_argument("--corpus", choices=sorted(CORPORA), default="issue18",
                    help="issue18: cases.py, the divergences; methods: method_cases.py, the added methods; "
                         "slices: slice_cases.py, slices, gradients and frankenmerges")
    args = ap.parse_args()
    CASES, OUT, layers = CORPORA[args.corpus]
    import torch
    from safetensors.torch import load_file, save_file

    OUT.mkdir(parents=True, exist_ok=True)
    manifest_path = OUT / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() and args.only else {"cases": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "in"
        manifest["inputs"] = inputs.build(root, layers)
        manifest["mergekit"] = subprocess.run([str(Path(args.mergekit).parent / "python"), "-c",
                                               "import importlib.metadata as m; print(m.version('mergekit'), "
                                               "m.version('torch'), m.version('transformers'))"],
                                              capture_output=True, text=True).stdout.strip()
        for name, case in CASES.items():
            if args.only and name not in args.only:
                continue
            recipe = recipe_for(case, str(root))
            cfg = Path(tmp) / f"{name}.yml"
            cfg.write_text(yaml.safe_dump(recipe, sort_keys=False))
            out = Path(tmp) / "out" / name
            r = subprocess.run([args.mergekit, str(cfg), str(out), "--copy-tokenizer", "--random-seed", "0"],
                               capture_output=True, text=True)
            entry: dict = {"rc": r.returncode}
            if r.returncode != 0:
                lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
                entry["error"] = (lines[-1] if lines else "").replace(str(root), "{root}")
            else:
                tensors = {}
                for f in sorted(out.glob("*.safetensors")):
                    tensors.update(load_file(str(f)))
                # NaN or infinities (linear weights that sum to zero): recorded, not stored
                entry["nan"] = any(not bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
                config = json.loads((out / "config.json").read_text())
                entry["config_dtype"] = config.get("dtype", config.get("torch_dtype"))
                if layers != inputs.LAYERS:
                    entry["num_hidden_layers"] = config.get("num_hidden_layers")
                entry["tokenizer"] = tokenizer_summary(out)
                if not entry["nan"]:
                    target = OUT / f"{name}.safetensors"
                    save_file(tensors, str(target), metadata={"format": "pt"})
                    entry["tensors_sha256"] = hashlib.sha256(target.read_bytes()).hexdigest()
            manifest["cases"][name] = entry
            print(f"{name}: {entry.get('error') or ('NaN' if entry.get('nan') else 'ok')}", flush=True)
    manifest_path.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
