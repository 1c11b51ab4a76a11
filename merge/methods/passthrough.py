"""Passthrough: one model's tensor as it is, or scaled; the method of frankenmerges."""

from __future__ import annotations

from zoo.merge.methods.base import MergeMethod, register
from zoo.merge.methods.params import Param, check_number


@register
class Passthrough(MergeMethod):
    """Copy each tensor from its one source, times ``scale`` where given.

    With ``slices`` it stacks and reorders layers (frankenmerges, depth up-scaling as in
    Kim et al., "SOLAR 10.7B: Scaling Large Language Models with Simple yet Effective
    Depth Up-Scaling", arXiv 2312.15166). As in mergekit, ``scale`` multiplies in the
    tensor's dtype.
    """

    name = "passthrough"
    reference = ('Goddard et al., "Arcee\'s MergeKit: A Toolkit for Merging Large Language Models", '
                 'EMNLP 2024 Industry, arXiv 2403.13257')
    needs_base = False
    base_is_input = True  # mergekit allows one input in all, a base_model included
    min_models = 1
    max_models = 1
    elementwise = True
    model_parameters = {"scale": Param(None, check_number, "multiply the tensor by this (e.g. 0 to zero a "
                                                           "layer's output projection)")}

    def merge(self, base, tensors, params, options, ctx):
        scale = params[0].get("scale")
        x = tensors[0]
        return x if scale is None else x * scale
