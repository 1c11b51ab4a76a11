"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023, arXiv 2212.09849), with FusionBench's parameter names and defaults."""

from __future__ import annotations

from typing import Any

import torch

from zoo.errors import ZooError

from zoo.merge.methods.base import MergeMethod, TensorContext, register
from zoo.merge.methods.learned import MODEL
from zoo.merge.methods.params import Param, check_positive_int, check_string, check_unit

# FusionBench 0.2.33's defaults (its base RegMean config); its CLIP config uses
# reduce_non_diagonal_ratio 0.95, its GPT-2 config 0.6.
# The Cholesky fallback: a ridge of RIDGE times the mean diagonal of the summed Gram,
# times 10 per failed try, at most RIDGE_TRIES tries.
RIDGE = 1e-6
RIDGE_TRIES = 7


# Where a data-aware merge's statistics come from (RegMean's and Fisher's one setting in common).
STATISTICS_SPLIT = {"split": Param("train", check_string,
                                   "the split of a registry task the statistics are collected on")}


@register
class RegMean(MergeMethod):
    """RegMean: each linear weight fits every expert's outputs on its own inputs (closed form); the mean elsewhere.

    Per ``nn.Linear`` weight W (out x in), with G_i expert i's per-token mean Gram
    matrix of the layer's inputs on its task's pool and G~ = alpha G + (1 - alpha)
    diag(G): W* = ((sum_i G~_i)^-1 sum_i G~_i W_i^T)^T, solved in float64. Every other
    merged tensor (biases, norms, embeddings, convolutions) is the plain mean of the
    experts' full weights, as the paper and FusionBench do.
    """

    name = "regmean"
    reference = ('Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023, '
                 'arXiv 2212.09849')
    statistics = "gram"
    parameters = {
        "reduce_non_diagonal_ratio": Param(0.1, check_unit, "alpha: off-diagonal Gram entries are multiplied by it "
                                                            "(1: exact least squares; FusionBench's CLIP config: 0.95)"),
        "num_regmean_examples": Param(256, check_positive_int, "examples of each expert's task pool its Gram "
                                                               "matrices are collected on"),
        **STATISTICS_SPLIT,
    }
    model_parameters = MODEL

    def streams(self, name: str, shape: tuple[int, ...], options: dict[str, Any]) -> bool:
        return len(shape) != 2  # a matrix may be a linear weight, solved whole; the rest is a mean

    def merge(self, base, tensors, params, options, ctx):
        grams = statistics_of(ctx, self.name).tensors(ctx.name) if base.dim() == 2 else None
        if grams is None:
            return mean(tensors, ctx.scratch).to(base.dtype)
        ratio = float(self.option(options, "reduce_non_diagonal_ratio"))
        return regmean_solve(tensors, [g.to(base.device) for g in grams], ratio).to(base.dtype)

    def card_lines(self, learned):
        return statistics_card(learned, "the RegMean closed form (float64, Cholesky; a small ridge where the "
                                        "summed Gram is not positive definite)", "the mean of the experts' weights")


def statistics_of(ctx: TensorContext, method: str):
    """The merge's per-expert statistics (``zoo.merge.statistics.Statistics``)."""
    stats = (ctx.stats or {}).get("statistics")
    if stats is None:
        raise ZooError(f"{method} weighs the experts with statistics collected by running them on their task data; "
                       "merge with zoo merge, which collects them")
    return stats


def mean(tensors: list[torch.Tensor], scratch: bool = False) -> torch.Tensor:
    """The mean of the experts' full weights (any piece of a tensor)."""
    acc = tensors[0] if scratch else tensors[0].clone()
    for x in tensors[1:]:
        acc.add_(x)
    return acc.div_(len(tensors))


def shrink(gram: torch.Tensor, ratio: float) -> torch.Tensor:
    """alpha G + (1 - alpha) diag(G): off-diagonal entries times alpha, the diagonal kept."""
    out = gram * ratio
    out.diagonal().copy_(gram.diagonal())
    return out


def regmean_solve(weights: list[torch.Tensor], grams: list[torch.Tensor], ratio: float) -> torch.Tensor:
    """W* = ((sum G~_i)^-1 sum G~_i W_i^T)^T for weights W_i (out x in) and Grams G_i
    (in x in), in float64. A summed Gram of zeros (a layer that saw only zero inputs)
    says nothing: the mean of the weights."""
    a = torch.zeros(grams[0].shape, dtype=torch.float64, device=weights[0].device)
    b = torch.zeros(weights[0].shape[::-1], dtype=torch.float64, device=weights[0].device)
    for w, g in zip(weights, grams):
        g = shrink(g.to(torch.float64), ratio)
        a.add_(g)
        b.addmm_(g, w.to(torch.float64).T)
    if not bool(a.any()):
        return mean([w.to(torch.float64) for w in weights])
    return solve_spd(a, b).T


def solve_spd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a^-1 b for a symmetric positive semi-definite ``a``: a Cholesky solve; where the
    factorisation fails (a singular Gram: a layer whose inputs span fewer dimensions
    than it has), again with a ridge of 1e-6 of a's mean diagonal, ten times larger per
    try (FusionBench inverts with no ridge)."""
    chol, info = torch.linalg.cholesky_ex(a)
    ridge = RIDGE * float(a.diagonal().abs().mean())
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    for _ in range(RIDGE_TRIES):
        if int(info) == 0:
            return torch.cholesky_solve(b, chol)
        chol, info = torch.linalg.cholesky_ex(a + ridge * eye)
        ridge *= 10
    if int(info) == 0:
        return torch.cholesky_solve(b, chol)
    raise ZooError("regmean: the summed Gram matrix is not positive definite even with a ridge; the statistics are "
                   "broken (NaN or negative entries)")


def statistics_card(record: dict[str, Any] | None, weighed: str, rest: str) -> list[str]:
    """The card's paragraph on the statistics and which tensors got which rule (the
    recipe above lists the tensors that got the mean)."""
    if not record:
        return []
    tensors = record.get("tensors") or {}
    done = next((v for k, v in tensors.items() if k not in ("mean", "mean_tensors")), 0)
    fisher = record.get("kind") == "fisher"
    what = ("the label-free diagonal Fisher (FusionBench's batch approximation: per batch of "
            f"{record['batch_size']}, the squared gradient of the sum over examples and classes of sqrt(p)·log p, "
            "p detached; not the paper's exact per-example expectation)") if fisher else \
        "the per-token mean Gram matrix of every merged linear layer's inputs"
    experts = ", ".join(f"`{e['model']}` on {e['examples']} examples of task `{e['task']}`"
                        for e in record.get("experts", []))
    return [f"Each expert was run over its own task's `{record['split']}` split (up to {record['examples']} "
            f"examples, no labels) for {what}: {experts}. The statistics are stored as lineage artifacts of each "
            "expert, keyed by the data's sha256 and these settings, so a merge with the same settings reuses them.",
            "", f"{done} tensors got {weighed}; {tensors.get('mean', 0)} got {rest} (`statistics.tensors.mean_tensors` "
            "in the recipe above).", ""]
