"""What a Concrete merge's learned mask is: how sparse and how binary its keep
probabilities are, and how much the one random draw folded into the saved model moves
its accuracy (arXiv 2312.06173 saves one draw; fusion_bench's default draw is relaxed).

The merge is rebuilt from its lineage (coefficients, mask logits) exactly as a parity
start is, then measured under fresh draws of its final mask. The logits come from the
mask artifact, stored as int8 in steps of 1/16, so fresh draws are from that rounding
of the learned distribution."""

from __future__ import annotations

from typing import Any

import torch

from zoo.checkpoints.reader import open_safetensors
from zoo.checkpoints.taskdata import load_split, task_info
from zoo.evaluate import accuracy, load_model
from zoo.registry import Registry
from zoo.registry.resolve import open_model

from zoo.merge.learned.merger import Merger, rescale
from zoo.merge.learned.runtime import build_body
from zoo.merge.starts import resolve_start


def _tensors(registry: Registry, ref: str, names: list[str]) -> dict[str, torch.Tensor]:
    folder = registry.model_dir(ref)
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for f in files:
        ck = open_safetensors(f)
        out.update({n: ck.read_tensor(n).float() for n in names if n in ck.tensors})
    return out


def mask_stats(logits: dict[str, torch.Tensor]) -> dict[str, float]:
    """Over every masked element: the mean keep probability σ(x), the fraction a binary
    draw would drop on average (1 - mean σ), how binary the probabilities are
    (mean |2σ(x) - 1|: 0 all at ½, 1 all at 0 or 1), and the mean |logit|."""
    x = torch.cat([v.reshape(-1).float() for v in logits.values()])
    p = torch.sigmoid(x)
    return {"keep": float(p.mean()), "sparsity": float(1 - p.mean()),
            "binariness": float((2 * p - 1).abs().mean()), "mean_abs_logit": float(x.abs().mean())}


def mask_report(registry: Registry, name: str, experts: dict[str, str], draws: int = 5,
                seed: int = 1000) -> dict[str, Any]:
    """``name``'s mask statistics, and its average test accuracy under ``draws`` fresh
    draws of its final mask (of the kind it was saved with), beside the saved draw's."""
    info = registry.show(name)
    recipe = info["recipe"]
    learned = recipe.get("learned") or {}
    names = list(learned["coefficient_tensors"])
    refs = [m["model"] for m in recipe["models"]]
    base = _tensors(registry, recipe["base_model"], names)
    tvs = [{n: t - base[n] for n, t in _tensors(registry, ref, names).items()} for ref in refs]
    start = resolve_start(name, recipe, refs, recipe["base_model"], registry, tvs)
    kind = learned.get("final_mask", "bernoulli")  # merges made before the option saved a binary draw
    temperature = float((recipe.get("parameters") or {}).get("temperature", 0.5))
    merger = Merger(base, start.directions, coefficients="layer", mask=start.mask, temperature=temperature)
    merger.set_coefficients(start.coefficient_matrix(merger.names))
    merger.set_logits(start.mask_logits or {})

    models, data = {}, {}
    for task, ref in experts.items():
        models[task] = load_model(registry, ref)
        path = registry.task_data(task)
        data[task] = (*load_split(path, "test"), task_info(path)["input"])

    # checkpoint names -> the module's (recent transformers rename some weights on load)
    body = build_body(open_model(recipe["base_model"], registry)[0], torch.device("cpu"))

    def average(mask) -> float:
        with torch.no_grad():
            merged = body.rename(merger.merged(rescale(mask)))
        accs = []
        for task, model in models.items():
            missing = [n for n in merged if n not in model.state_dict()]
            if missing:
                raise KeyError(f"{task}: the model has no tensor {missing[0]}")
            model.load_state_dict(merged, strict=False)
            x, y, input_name = data[task]
            accs.append(accuracy(model, x, y, input_name))
        return sum(accs) / len(accs)

    saved = average(start.mask_bits)
    fresh = [average(merger.draw_final(kind, torch.Generator().manual_seed(seed + i))) for i in range(draws)]
    mean = sum(fresh) / len(fresh)
    std = (sum((a - mean) ** 2 for a in fresh) / max(len(fresh) - 1, 1)) ** 0.5
    # the lineage's statistics (from the exact logits; above ½ and binariness) where it has them
    return {"model": info["ref"], "final_mask": kind, **mask_stats(start.mask_logits or {}),
            **(learned.get("mask_stats") or {}), "saved_avg": saved,
            "draw_avgs": fresh, "draw_mean": mean, "draw_std": std, "draw_range": max(fresh) - min(fresh)}
