"""Run every corpus recipe (recipes.py) through mergekit 0.1.5 and ``zoo merge``, compare, classify.

    .venv/bin/python bench/mergekit_corpus/run_corpus.py --mergekit-python VENV/bin/python [--work DIR]

mergekit runs in its own virtual environment (one process for all recipes, with
``copy_tokenizer`` and ``random_seed: 0``, as ``mergekit-yaml --random-seed 0`` does);
zoo runs in this one, through the same API ``zoo merge`` calls. For each recipe it
compares every tensor, the dtype, layer count and vocabulary size that ``config.json``
names, and the tokenizer (vocabulary, settings, chat template), then classifies:

- ``identical``: every tensor bit for bit, and the config and tokenizer the same;
- ``rounding``: some tensor differs, each by at most 2 ULPs (of the output dtype) of the
  tensor's largest magnitude; the reason is the order or dtype of the arithmetic;
- ``arbitrary in mergekit``: the tensors are identical and what differs is mergekit's
  own arbitrary choice: the tokenizer it copies when no ``base_model`` names one
  (``referenced_models()[0]`` of a Python set: hash order), or the ``torch.`` prefix it
  echoes from the recipe into config.json's dtype;
- ``random``: a DARE/DELLA method (Bernoulli masks from a different RNG stream): the
  kept fraction of the merged task vector within 0.05 and its L1 norm within 15%;
- ``refused``: zoo refuses with one line (``ZooError``) where mergekit merges, or
  writes NaN, or refuses too (``refused_by``);
- ``SILENT DIVERGENCE``: both write, and something differs beyond the above; or zoo
  writes where mergekit refuses;
- ``crash``: zoo raises something other than its one-line error.

Writes bench/results/mergekit_corpus.json and docs/mergekit_corpus.md.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(HERE))

import families  # noqa: E402
import inputs  # noqa: E402
from recipes import RANDOM_METHODS, RECIPES, fill  # noqa: E402

from zoo import merge  # noqa: E402
from zoo.errors import ZooError  # noqa: E402

DOCS_MERGING = ROOT / "docs" / "merging.md"


def family_dir(family: str) -> str:
    return "parity/" + family.split("-", 1)[1] if family.startswith("parity-") else family


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        if f.name != "task_heads.safetensors":
            out.update(load_file(str(f)))
    return out


def summary(folder: Path) -> dict:
    """What a merge's config.json and tokenizer say, for comparison."""
    cfg = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else {}
    out = {"dtype": cfg.get("torch_dtype", cfg.get("dtype")),
           "layers": cfg.get("num_hidden_layers", cfg.get("n_layer")), "vocab_size": cfg.get("vocab_size")}
    if (folder / "tokenizer.json").exists():
        data = json.loads((folder / "tokenizer.json").read_text())
        vocab = dict(data["model"]["vocab"])
        for tok in data.get("added_tokens") or []:
            vocab[tok["content"]] = tok["id"]
        tcfg = json.loads((folder / "tokenizer_config.json").read_text()) \
            if (folder / "tokenizer_config.json").exists() else {}
        template = tcfg.get("chat_template")
        if template is None and (folder / "chat_template.jinja").exists():
            template = (folder / "chat_template.jinja").read_text()
        out["tokenizer"] = {"vocab_sha256": hashlib.sha256(json.dumps(vocab, sort_keys=True).encode()).hexdigest()[:16],
                            "model_max_length": tcfg.get("model_max_length"),
                            "chat_template": hashlib.sha256(template.encode()).hexdigest()[:12] if template else None}
    else:
        out["tokenizer"] = None
    return out


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    bits = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16,
            torch.float64: torch.int64}[a.dtype]
    x, y = a.view(bits).to(torch.int64), b.view(bits).to(torch.int64)
    top = torch.iinfo(bits).min
    x = torch.where(x < 0, top - x, x)
    y = torch.where(y < 0, top - y, y)
    return int((x - y).abs().max()) if x.numel() else 0


def compare(mk: Path, zoo: Path, method: str, base: Path | None, no_base_tokenizer: bool) -> tuple[str, str, dict]:
    """(class, reason, numbers) for two written merges. ``no_base_tokenizer``: the recipe
    names no base and no tokenizer source, so mergekit copies a tokenizer picked in set order."""
    a, b = tensors(zoo), tensors(mk)
    sa, sb = summary(zoo), summary(mk)
    facts: dict = {"mergekit": sb, "zoo": sa}
    if set(a) != set(b):
        missing, extra = sorted(set(b) - set(a)), sorted(set(a) - set(b))
        return "SILENT DIVERGENCE", f"tensor names differ: zoo lacks {missing[:3]}, has extra {extra[:3]}", facts
    named = str(sb["dtype"]).removeprefix("torch.")
    upcast = [n for n in b if b[n].dtype == torch.float32 and a[n].dtype != torch.float32
              and str(a[n].dtype).removeprefix("torch.") == named and a[n].shape == b[n].shape]
    if upcast and all(torch.equal(a[n], b[n].to(a[n].dtype)) for n in upcast) and \
            all(a[n].dtype == b[n].dtype or n in upcast for n in b):
        # mergekit saves some methods' results in float32 while its config.json names
        # another dtype; zoo saves the dtype the config names (docs/merging.md says so)
        for n in upcast:
            b[n] = b[n].to(a[n].dtype)
        if all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in b) and sa["dtype"] == sb["dtype"]:
            return "rounding", f"{len(upcast)} tensors: mergekit saves float32 under a {named} config.json; zoo " \
                               f"saves {named}, equal to mergekit's values rounded once", facts
    for n in b:
        if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape:
            return "SILENT DIVERGENCE", f"tensor {n}: zoo {a[n].dtype}{list(a[n].shape)} vs mergekit " \
                                        f"{b[n].dtype}{list(b[n].shape)}", facts
    arbitrary = []
    if sa["dtype"] != sb["dtype"] and str(sb["dtype"]).removeprefix("torch.") == sa["dtype"]:
        arbitrary.append(f"config.json dtype: mergekit echoes {sb['dtype']!r}, zoo writes {sa['dtype']!r}")
        sb = {**sb, "dtype": sa["dtype"]}
    if sa["dtype"] != sb["dtype"] and no_base_tokenizer:
        arbitrary.append(f"config.json: mergekit copies the config of a model picked in set order (dtype "
                         f"{sb['dtype']!r}), zoo the first model's ({sa['dtype']!r})")
        sb = {**sb, "dtype": sa["dtype"]}
    if sa["tokenizer"] != sb["tokenizer"] and no_base_tokenizer and sa["tokenizer"] and sb["tokenizer"] \
            and sa["tokenizer"]["vocab_sha256"] == sb["tokenizer"]["vocab_sha256"]:
        arbitrary.append(f"tokenizer settings: mergekit copies a model's picked in set order "
                         f"(model_max_length {sb['tokenizer']['model_max_length']}), zoo the first model's "
                         f"({sa['tokenizer']['model_max_length']})")
        sb = {**sb, "tokenizer": sa["tokenizer"]}
    for key in ("dtype", "layers", "vocab_size", "tokenizer"):
        if sa[key] != sb[key]:
            return "SILENT DIVERGENCE", f"config.json/tokenizer {key}: zoo {sa[key]} vs mergekit {sb[key]}", facts
    differ = [n for n in b if not torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8))]
    if not differ:
        return ("arbitrary in mergekit", "; ".join(arbitrary), facts) if arbitrary else ("identical", "", facts)
    if method in RANDOM_METHODS and base is not None:
        ref = tensors(base)
        stats = {}
        for tool, sd in (("zoo", a), ("mergekit", b)):
            kept = total = 0
            l1 = 0.0
            for n, t in sd.items():
                d = t.double() - ref[n].to(t.dtype).double() if n in ref else None
                if d is None or not t.is_floating_point():
                    continue
                kept += int((d != 0).sum())
                total += d.numel()
                l1 += float(d.abs().sum())
            stats[tool] = {"kept_fraction": kept / max(total, 1), "l1": l1}
        facts["random"] = stats
        dk = abs(stats["zoo"]["kept_fraction"] - stats["mergekit"]["kept_fraction"])
        ratio = stats["zoo"]["l1"] / max(stats["mergekit"]["l1"], 1e-30)
        if dk <= 0.05 and 0.85 <= ratio <= 1.15:
            return "random", f"kept {stats['zoo']['kept_fraction']:.3f} vs {stats['mergekit']['kept_fraction']:.3f}, " \
                             f"L1 ratio {ratio:.3f}", facts
        return "SILENT DIVERGENCE", f"random masks differ in law: kept {stats['zoo']['kept_fraction']:.3f} vs " \
                                    f"{stats['mergekit']['kept_fraction']:.3f}, L1 ratio {ratio:.3f}", facts
    worst, worst_n, ulps = 0.0, "", 0
    for n in differ:
        x, y = a[n].double(), b[n].double()
        if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
            return "SILENT DIVERGENCE", f"{n}: non-finite values differ", facts
        scale = float(y.abs().max()) * torch.finfo(b[n].dtype).eps
        rel = float((x - y).abs().max()) / scale if scale else float("inf")
        ulps = max(ulps, _ulps(a[n], b[n]))
        if rel > worst:
            worst, worst_n = rel, n
    facts.update({"tensors_differing": len(differ), "tensors": len(b), "max_ulp": ulps,
                  "max_diff_in_top_ulps": worst})
    if worst <= 2.0:
        return "rounding", f"{len(differ)}/{len(b)} tensors differ by <= {worst:.2f} top-magnitude ULPs " \
                           f"(max {ulps} ULP elementwise): order/dtype of the arithmetic", facts
    return "SILENT DIVERGENCE", f"{worst_n}: max diff {worst:.3g} top-magnitude ULPs " \
                                f"({len(differ)}/{len(b)} tensors differ)", facts


def run_zoo(cfg: Path, out: Path) -> tuple[str, str]:
    try:
        merge.run(merge.load(str(cfg)), out_dir=out, device="cpu")
        return "ok", ""
    except ZooError as e:
        return "refused", str(e)
    except Exception as e:  # noqa: BLE001 - a crash is a result
        return "crash", f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"[:300]


def named_in_docs(line: str) -> bool | None:
    """Whether the refusal's subject (a quoted word, or "gradient") appears in docs/merging.md;
    None when the line names no such subject (left to a reader)."""
    words = re.findall(r"['\"`]([^'\"`/]{2,40})['\"`]", line) + (["gradient"] if "gradient" in line else [])
    text = DOCS_MERGING.read_text()
    return any(re.search(rf"\b{re.escape(w)}\b", text) for w in words) if words else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mergekit-python", default="/work/bench-env/mergekit-venv/bin/python".strip(),
                    help="the Python of mergekit 0.1.5's own virtual environment")
    ap.add_argument("--work", type=Path, default=Path("/tmp/zoo-mergekit-corpus"))
    ap.add_argument("--only", default="", help="regex: run only the recipes it matches")
    ap.add_argument("--reuse-mergekit", action="store_true", help="keep mergekit's outputs from the last run")
    args = ap.parse_args()
    work = args.work
    names = [n for n in RECIPES if re.search(args.only, n)]
    if not args.reuse_mergekit:
        shutil.rmtree(work, ignore_errors=True)
        families.build(work / "in")
        inputs.build(work / "in" / "parity")
    (work / "cfg").mkdir(parents=True, exist_ok=True)
    (work / "zoo").mkdir(parents=True, exist_ok=True)
    jobs = []
    for n in names:
        r = RECIPES[n]
        cfg = work / "cfg" / f"{n}.yml"
        cfg.write_text(yaml.safe_dump(fill(r["recipe"], str(work / "in"), family_dir(r["family"])), sort_keys=False))
        jobs.append([n, str(cfg), str(work / "mk" / n)])
    mk_results_path = work / "mk_results.json"
    t0 = time.time()
    if not args.reuse_mergekit:
        (work / "jobs.json").write_text(json.dumps(jobs))
        # a fixed hash seed: mergekit orders some choices by a Python set
        subprocess.run([args.mergekit_python, str(HERE / "mk_driver.py"), str(work / "jobs.json"),
                        str(mk_results_path), str(work / "lora_cache")], check=False,
                       env={**os.environ, "PYTHONHASHSEED": "0"})
    mk_results = json.loads(mk_results_path.read_text())
    versions = subprocess.run([args.mergekit_python, "-c", "import importlib.metadata as m; "
                               "print(m.version('mergekit'), m.version('torch'), m.version('transformers'))"],
                              capture_output=True, text=True).stdout.split()
    rows = {}
    for n in names:
        r = RECIPES[n]
        cfg = work / "cfg" / f"{n}.yml"
        zoo_out = work / "zoo" / n
        shutil.rmtree(zoo_out, ignore_errors=True)
        status, line = run_zoo(cfg, zoo_out)
        mk = mk_results.get(n, {"rc": 1, "error": "mergekit did not run it (driver died)"})
        mk_out = work / "mk" / n
        mk_nan = False
        if mk["rc"] == 0:
            mk_nan = any(t.is_floating_point() and not bool(torch.isfinite(t).all()) for t in tensors(mk_out).values())
        row = {"family": r["family"], "source": r["source"], "method": r["recipe"]["merge_method"],
               "mergekit": "NaN" if mk_nan else ("ok" if mk["rc"] == 0 else mk["error"]),
               "zoo": "ok" if status == "ok" else line}
        if status == "crash":
            row["class"], row["reason"] = "crash", line
        elif status == "refused":
            row["class"] = "refused"
            row["reason"] = line
            row["refused_by"] = "both" if mk["rc"] != 0 else ("zoo (mergekit writes NaN)" if mk_nan else "zoo")
            row["named_in_docs"] = named_in_docs(line)
        elif mk["rc"] != 0:
            row["class"], row["reason"] = "SILENT DIVERGENCE", "zoo writes a model where mergekit refuses"
        elif mk_nan:
            row["class"], row["reason"] = "SILENT DIVERGENCE", "mergekit writes NaN, zoo writes a model"
        else:
            base = r["recipe"].get("base_model")
            base_path = Path(fill({"b": base}, str(work / "in"), family_dir(r["family"]))["b"]) if base else None
            rec = r["recipe"]
            no_base_tok = not base and not any(k in rec for k in ("tokenizer_source", "tokenizer"))
            cls, reason, facts = compare(mk_out, zoo_out, row["method"], base_path, no_base_tok)
            row.update({"class": cls, "reason": reason})
            for k in ("max_ulp", "tensors_differing", "random"):
                if k in facts:
                    row[k] = facts[k]
            if cls == "SILENT DIVERGENCE":
                row["config"] = {"mergekit": facts["mergekit"], "zoo": facts["zoo"]}
        for k in ("mergekit", "zoo", "reason"):
            row[k] = row[k].replace(str(work / "in") + "/", "")
        rows[n] = row
        print(f"{n}: {row['class']} {row.get('reason', '')[:150]}", flush=True)
    counts: dict[str, int] = {}
    for row in rows.values():
        counts[row["class"]] = counts.get(row["class"], 0) + 1
    result = {"mergekit": versions, "torch": torch.__version__, "recipes": len(rows), "counts": counts,
              "wall_s": round(time.time() - t0, 1), "cases": rows}
    if not args.only:
        (ROOT / "bench" / "results" / "mergekit_corpus.json").write_text(json.dumps(result, indent=1) + "\n")
        write_table(result)
    print(json.dumps(counts))


def write_table(result: dict) -> None:
    lines = ["# mergekit corpus: every recipe through mergekit 0.1.5 and `zoo merge`", "",
             "Made by `bench/mergekit_corpus/run_corpus.py` (the classes are defined in its docstring); "
             "the numbers are in `bench/results/mergekit_corpus.json`. "
             f"mergekit {' / torch '.join(result['mergekit'][:2])}, zoo's torch {result['torch']}.", "",
             "| class | recipes |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(result["counts"].items())]
    lines += ["", "| recipe | family | source | class | detail |", "|---|---|---|---|---|"]
    for n, row in result["cases"].items():
        detail = row.get("reason", "")
        if row["class"] == "refused":
            detail = f"{row['refused_by']}: {detail}" + \
                {True: "", False: " (not named in docs/merging.md)", None: ""}[row.get("named_in_docs")]
        if row["class"] == "refused" and row["refused_by"] == "both":
            detail += f"; mergekit: {row['mergekit']}"
        detail = detail.replace("|", "\\|").replace("\n", " ")
        lines.append(f"| `{n}` | {row['family']} | {row['source']} | {row['class']} | {detail} |")
    (ROOT / "docs" / "mergekit_corpus.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
