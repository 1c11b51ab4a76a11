"""Model Stock: interpolate between the base and the models' average by the angle
between their task vectors."""

from __future__ import annotations

import math

import torch

from zoo.merge.methods.base import MergeMethod, TensorContext, register, whole_rows
from zoo.merge.methods.params import Param, check_bool
from zoo.merge.methods.streamed import Gram, Rows, large


@register
class ModelStock(MergeMethod):
    """Model Stock: theta = t * mean(theta_i) + (1 - t) * theta_0, t from the task vectors' mean cosine.

    t = N cos / (1 + (N-1) cos), cos the mean pairwise cosine of the task vectors.
    """

    name = "model_stock"
    reference = 'Jang et al., "Model Stock: All we need is just a few fine-tuned models", ECCV 2024, arXiv 2403.19522'
    min_models = 2
    parameters = {"filter_wise": Param(False, check_bool, "one cosine per row instead of per tensor")}

    def streams(self, name, shape, options):
        # per tensor: the task vectors' dot products in one pass, then elementwise;
        # filter_wise: in blocks of whole rows
        return large(shape)

    def piece_elems(self, shape, options, chunk):
        return whole_rows(shape, chunk) if self.option(options, "filter_wise") else chunk

    def tensor_collector(self, shape, params, options, ctx):
        if self.option(options, "filter_wise"):
            return Rows(shape[-1])
        return Gram(lambda base, tensors: [x - base for x in tensors])

    def merge(self, base, tensors, params, options, ctx):
        if ctx.stats is not None and "rows" in ctx.stats:  # a block of whole rows of a streamed tensor
            cols = ctx.stats["rows"]
            return self.merge(base.view(-1, cols), [x.view(-1, cols) for x in tensors], params, options,
                              TensorContext(ctx.name, ctx.seed)).reshape(-1)
        if ctx.stats is not None:  # a piece of a streamed tensor, its cosines summed already
            return self.merge_piece(base, tensors, ctx.stats["gram"])
        shape = base.shape
        if self.option(options, "filter_wise"):
            w0 = base.unsqueeze(0) if base.dim() == 1 else base
            ws = [w.unsqueeze(0) if w.dim() == 1 else w for w in tensors]
        else:
            w0 = base.reshape(-1)
            ws = [w.reshape(-1) for w in tensors]
        offsets = [w - w0 for w in ws]
        cosines = []
        for i in range(len(offsets)):
            for j in range(i + 1, len(offsets)):
                norms = offsets[i].norm(dim=-1) * offsets[j].norm(dim=-1)
                cosines.append(((offsets[i] * offsets[j]).sum(dim=-1) / norms.clamp(min=1e-6)).clamp(-1, 1))
        cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
        n = len(ws)
        t = (n * cos) / (1 + (n - 1) * cos)
        avg = sum(ws) / n
        return (t * avg + (1 - t) * w0).reshape(shape)

    @staticmethod
    def merge_piece(base: torch.Tensor, tensors: list[torch.Tensor], gram: list[list[float]]) -> torch.Tensor:
        """A piece of a streamed tensor given its task vectors' dot products: the same
        interpolation as the whole-tensor formula, with the mean cosine from the sums."""
        n = len(tensors)
        cosines = []
        for i in range(n):
            for j in range(i + 1, n):
                norms = max(math.sqrt(gram[i][i]) * math.sqrt(gram[j][j]), 1e-6)
                cosines.append(min(1.0, max(-1.0, gram[i][j] / norms)))
        cos = torch.tensor([sum(cosines) / len(cosines)], dtype=base.dtype, device=base.device)
        t = (n * cos) / (1 + (n - 1) * cos)
        avg = sum(tensors) / n
        return t * avg + (1 - t) * base
