"""Benchmark: `zoo moe` against mergekit-moe on the same configs: time, peak memory, and
whether every tensor is equal.

Two families, three Llama experts each, made into a Mixtral of three experts (two per
token):

* tiny: a seeded 3-layer Llama (hidden 64) with a character tokenizer, experts = the
  base with seeded noise on their MLPs (built here, in seconds);
* medium: the 1B LLaMA family (bf16, 20 layers, hidden 2048) at --medium (base/,
  expert1-3/), linked into folders that also hold a character tokenizer (the family
  has none, and both tools need one for the prompts).

Each gate mode in --modes runs both tools as commands, each in its own process, one
after the other: wall time and the peaks of anonymous and file-backed memory of the
process tree (bench/common.py), each after reading every input file once (a warm page
cache for both). For ``hidden`` both load the base in bfloat16 and run
it on the prompts, so the anonymous peak includes the whole base. The outputs are
compared tensor by tensor (names, dtypes, values) and removed.

Results go to bench/results/moe_build.json; docs/results.md has the table.

    .venv/bin/python bench/moe_build.py [--medium DIR] [--mergekit PATH] [--modes hidden,cheap_embed]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from common import run_measured, save
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = {  # three tasks whose prompts use different characters
    "digits": ["12 + 34 =", "7 * 8 =", "100 - 45 =", "3 + 3 ="],
    "lower": ["sort: dcba", "rev: hello", "count: banana", "sort: zyx"],
    "upper": ["UPPER: abc", "CAESAR: HAL", "UPPER: zoo", "CAESAR: IBM"],
}


def tiny_family(root: Path) -> dict[str, Path]:
    from safetensors.torch import load_file, save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from zoo.demo.llm_zoo import BOS, EOS, PAD, save_tokenizer, vocabulary

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocabulary()), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, bos_token_id=BOS,
                      eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(root / "base")
    save_tokenizer(root / "base", 64)
    out = {"base": root / "base"}
    sd = load_file(str(root / "base" / "model.safetensors"))
    for i, task in enumerate(PROMPTS):
        shutil.copytree(root / "base", root / task)
        g = torch.Generator().manual_seed(i + 1)
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) if ".mlp." in k else v for k, v in sd.items()},
                  str(root / task / "model.safetensors"), metadata={"format": "pt"})
        out[task] = root / task
    return out


def medium_family(medium: Path, root: Path) -> dict[str, Path]:
    """The family's folders as links, plus a character tokenizer in each."""
    from zoo.demo.llm_zoo import save_tokenizer

    out = {}
    for name, src in (("base", "base"), *zip(PROMPTS, ("expert1", "expert2", "expert3"))):
        folder = root / name
        folder.mkdir()
        for f in (medium / src).iterdir():
            os.symlink(f.resolve(), folder / f.name)
        save_tokenizer(folder, 2048)
        out[name] = folder
    return out


def config(family: dict[str, Path], mode: str) -> dict:
    return {"base_model": str(family["base"]), "gate_mode": mode, "experts_per_token": 2,
            "experts": [{"source_model": str(family[t]), "positive_prompts": p} for t, p in PROMPTS.items()]}


def compare(a: Path, b: Path) -> dict:
    """Tensor by tensor, one at a time (the medium outputs are ~5 GB each)."""
    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update({k: f for k in h.keys()})
        return out
    ia, ib = index(a), index(b)
    worst, unequal = 0.0, []
    for name in sorted(set(ia) & set(ib)):
        with safe_open(str(ia[name]), "pt") as ha, safe_open(str(ib[name]), "pt") as hb:
            x, y = ha.get_tensor(name), hb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x, y):
            unequal.append(name)
            if x.shape == y.shape:
                worst = max(worst, float((x.float() - y.float()).abs().max()))
    return {"tensors": len(ib), "same_names": set(ia) == set(ib), "unequal": unequal, "max_abs_diff": worst}


def warm(family: dict[str, Path]) -> None:
    """Read every input file once, so neither tool pays for a cold page cache that the
    other then finds warm (the medium family is 8 GB)."""
    for folder in family.values():
        for f in folder.iterdir():
            with open(f.resolve(), "rb") as h:
                while h.read(64 << 20):
                    pass


def run(family: dict[str, Path], mode: str, work: Path, mergekit: str | None) -> dict:
    cfg = work / f"{mode}.yml"
    cfg.write_text(yaml.safe_dump(config(family, mode)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "ZOO_REGISTRY": str(work / "reg.db")}
    zoo = [str(Path(sys.executable).parent / "zoo"), "moe", str(cfg), "--device", "cpu", "--out-dir"]
    warm(family)
    out: dict = {"zoo": run_measured(zoo + [str(work / "zoo-out")], env=env)}
    out["bytes"] = sum(p.stat().st_size for p in (work / "zoo-out").glob("*.safetensors"))
    if mergekit:
        warm(family)
        out["mergekit"] = run_measured([mergekit, str(cfg), str(work / "mk-out"), "--device", "cpu",
                                        "--random-seed", "0"], env=env)
        out["zoo_over_mergekit_wall"] = out["zoo"]["wall_s"] / out["mergekit"]["wall_s"]
        out["tensors"] = compare(work / "zoo-out", work / "mk-out")
    shutil.rmtree(work / "zoo-out", ignore_errors=True)
    shutil.rmtree(work / "mk-out", ignore_errors=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--medium", default="/work/bench-env/data/medium", help="a LLaMA family: base/, expert1-3/")
    ap.add_argument("--mergekit", default="/work/bench-env/mergekit-venv/bin/mergekit-moe",
                    help="mergekit-moe; a missing path skips mergekit")
    ap.add_argument("--modes", default="hidden,cheap_embed", help="gate modes, comma-separated")
    args = ap.parse_args()
    mergekit = args.mergekit if Path(args.mergekit).is_file() else None
    modes = args.modes.split(",")
    result: dict = {"modes": modes, "experts": len(PROMPTS), "experts_per_token": 2, "torch_threads":
                    torch.get_num_threads(), "load_average_at_start": os.getloadavg()}
    with tempfile.TemporaryDirectory(prefix="moe-bench-", dir=os.environ.get("BENCH_TMP")) as tmp:
        work = Path(tmp)
        (work / "tiny").mkdir()
        tiny = tiny_family(work / "tiny")
        result["tiny"] = {m: run(tiny, m, work, mergekit) for m in modes}
        medium = Path(args.medium)
        if (medium / "expert3").is_dir():
            (work / "medium").mkdir()
            fam = medium_family(medium, work / "medium")
            result["medium"] = {m: run(fam, m, work, mergekit) for m in modes}
        else:
            result["medium"] = f"skipped: no LLaMA family at {medium}"
    result["load_average_at_end"] = os.getloadavg()
    save("moe_build", result)


if __name__ == "__main__":
    main()
