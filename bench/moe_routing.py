"""Benchmark: does a `zoo moe` model route each task's prompts to that task's expert, and
what does it score, on the LLM demo zoo (a trained character-level Llama base and one
expert per task, zoo.demo.llm_zoo)?

For each gate mode, the five experts are assembled into a Mixtral (two experts per
token, mergekit's default) with routers built from 32 prompts of each task's pool:
once with positive prompts only, and once with 8 pool prompts of each other task as
the expert's negative prompts (mergekit's way to tell similar experts apart). On each
task's 256 test prompts (never seen by the routers) it measures:

* the top-1 share: of the routing decisions on the prompt's own tokens (BOS aside), the
  share that picks the task's expert, per layer and over all layers; and the same at
  the last token ("="), whose decision starts the answer;
* exact match of the greedy answers, next to the base's and the task's expert's.

Results go to bench/results/moe_routing.json; docs/results.md has the table.

    .venv/bin/python bench/moe_routing.py [--modes hidden,hidden_avg,cheap_embed] [--pool 32]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from common import save

from zoo.checkpoints.prompts import read_prompts
from zoo.demo.llm_zoo import LLM_FULL, exact_match, llm_zoo
from zoo.merge import moe


def shares(model, tok, prompts: list[str], expert: int) -> dict:
    """Top-1 shares over the prompts' tokens, and at the last token, per layer and in all."""
    batch = tok(prompts, return_tensors="pt", padding=True)  # left-padded: the last column is "="
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
    own = (batch["attention_mask"].bool() & (batch["input_ids"] != tok.bos_token_id)).reshape(-1)
    last = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    last[:, -1] = True
    last = last.reshape(-1)
    tokens = [float((logits.argmax(dim=-1)[own] == expert).float().mean()) for logits in out.router_logits]
    at_last = [float((logits.argmax(dim=-1)[last] == expert).float().mean()) for logits in out.router_logits]
    return {"top1_share": sum(tokens) / len(tokens), "top1_share_last_token": sum(at_last) / len(at_last),
            "top1_share_per_layer": tokens, "top1_share_last_token_per_layer": at_last}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="hidden,hidden_avg,cheap_embed,random")
    ap.add_argument("--pool", type=int, default=32, help="prompts per expert for the routers")
    args = ap.parse_args()
    torch.manual_seed(0)
    zoo_dir, _ = llm_zoo(LLM_FULL)
    tasks = list(LLM_FULL.tasks)
    test = {t: read_prompts(zoo_dir / "tasks" / t / "test.jsonl") for t in tasks}
    pools = {t: [p.prompt for p in read_prompts(zoo_dir / "tasks" / t / "pool.jsonl")[:args.pool]] for t in tasks}
    result: dict = {"zoo": LLM_FULL.key(), "tasks": tasks, "router_prompts_per_task": args.pool,
                    "test_prompts_per_task": len(test[tasks[0]])}

    def load(folder: Path):
        return AutoModelForCausalLM.from_pretrained(folder).eval()

    base = load(zoo_dir / "base")
    result["base_exact_match"] = {t: exact_match(base, test[t]) for t in tasks}
    result["expert_exact_match"] = {t: exact_match(load(zoo_dir / "experts" / t), test[t]) for t in tasks}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="moe-routing-") as tmp:
        for mode in args.modes.split(","):
            for negatives in ((False,) if mode in ("random", "uniform_random") else (False, True)):
                experts = [{"source_model": str(zoo_dir / "experts" / t), "positive_prompts": pools[t]}
                           for t in tasks]
                if negatives:
                    for t, e in zip(tasks, experts):
                        e["negative_prompts"] = [p for o in tasks if o != t for p in pools[o][:8]]
                cfg = moe.from_dict({"base_model": str(zoo_dir / "base"), "gate_mode": mode, "experts_per_token": 2,
                                     "experts": experts})
                name = f"{mode}{' + negatives' if negatives else ''}"
                out = Path(tmp) / name.replace(" + ", "-")
                info = moe.build(cfg, moe.MoeOptions(device="cpu"), out_dir=out)
                model, tok = load(out), AutoTokenizer.from_pretrained(out)
                row: dict = {"degenerate_layers": info["degenerate_layers"]}
                for i, t in enumerate(tasks):
                    row[t] = {**shares(model, tok, [p.prompt for p in test[t]], i),
                              "exact_match": exact_match(model, test[t])}
                runs[name] = row
                print(name, row["degenerate_layers"], {t: (round(row[t]["top1_share"], 3),
                                                           [round(x, 2) for x in row[t]["top1_share_per_layer"]],
                                                           round(row[t]["top1_share_last_token"], 3),
                                                           row[t]["exact_match"]) for t in tasks}, flush=True)
    result["moe"] = runs
    save("moe_routing", result)


if __name__ == "__main__":
    main()
