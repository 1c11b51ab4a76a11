"""The parity corpus's recipes for slices, gradients and frankenmerges, each run
through mergekit 0.1.5 and through ``zoo merge`` on four-layer inputs (inputs.py with
``LAYERS`` layers); the same form as cases.py, whose ``recipe_for`` fills them in.

``zoo`` is what zoo must do: ``same`` (every tensor bit for bit, and config.json's
dtype and number of layers) or ``refuse`` (one line matching ``match``).
"""

from __future__ import annotations

from typing import Any

LAYERS = 4

# The community's SLERP template: attention and MLP interpolated along opposite gradients.
SLERP_T = [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
           {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
           {"value": 0.5}]


def _src(name: str, start: int, end: int, **params: Any) -> dict[str, Any]:
    return {"model": "{" + name + "}", "layer_range": [start, end], **({"parameters": params} if params else {})}


def _m(name: str, **params: Any) -> dict[str, Any]:
    return {"model": "{" + name + "}", **({"parameters": params} if params else {})}


CASES: dict[str, dict[str, Any]] = {
    "slerp_template_f32": {"inputs": "f32", "recipe": {
        "merge_method": "slerp", "base_model": "{base}",
        "slices": [{"sources": [_src("base", 0, 4), _src("e0", 0, 4)]}],
        "parameters": {"t": SLERP_T}}},
    "slerp_template_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "slerp", "base_model": "{base}", "dtype": "bfloat16",
        "slices": [{"sources": [_src("base", 0, 4), _src("e0", 0, 4)]}],
        "parameters": {"t": SLERP_T}}},
    # the same gradients with models: one slice over every layer, t = i / 3
    "slerp_models_gradient_f32": {"inputs": "f32", "recipe": {
        "merge_method": "slerp", "base_model": "{base}", "models": [_m("e0")],
        "parameters": {"t": SLERP_T}}},
    # two slices: t restarts in each; the second slice has its own parameters
    "slerp_two_slices_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "slerp", "base_model": "{base}",
        "slices": [{"sources": [_src("base", 0, 2), _src("e1", 0, 2)]},
                   {"sources": [_src("base", 2, 4), _src("e1", 2, 4)], "parameters": {"t": [0.9, 0.1]}}],
        "parameters": {"t": [0.2, 0.8]}}},
    "ties_gradients_f32": {"inputs": "f32", "recipe": {
        "merge_method": "ties", "base_model": "{base}",
        "models": [_m("e0", weight=[1.0, 0.2], density=[0.3, 0.9]),
                   _m("e1", weight=[{"filter": "mlp", "value": [0.1, 0.9]}, {"value": 0.5}], density=0.5)]}},
    "task_arithmetic_gradient_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}",
        "models": [_m("e0", weight=[0.0, 0.3, 1.0]), _m("e2", weight=0.4)]}},
    # slice parameters over global ones, source parameters over both
    "linear_slice_params_f32": {"inputs": "f32", "recipe": {
        "merge_method": "linear", "parameters": {"weight": 1.0},
        "slices": [{"sources": [_src("e0", 0, 2, weight=3.0), _src("e1", 0, 2)]},
                   {"sources": [_src("e0", 2, 4), _src("e1", 2, 4)], "parameters": {"weight": [0.5, 2.0]}}]}},
    # the tensors after the layers pair the last slice's models with the first slice's count
    "linear_uneven_slices_f32": {"inputs": "f32", "recipe": {
        "merge_method": "linear", "parameters": {"weight": 0.5},
        "slices": [{"sources": [_src("e0", 0, 2)]},
                   {"sources": [_src("e1", 2, 4), _src("e2", 2, 4)]}]}},
    # a slice's own base_model
    "task_arithmetic_slice_base_f32": {"inputs": "f32", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "parameters": {"weight": 0.7},
        "slices": [{"sources": [_src("base", 0, 2), _src("e0", 0, 2)]},
                   {"sources": [_src("e1", 2, 4), _src("e0", 2, 4)], "base_model": "{e1}"}]}},
    # frankenmerges: layers stacked from two models, six layers out of four
    "passthrough_stack_f32": {"inputs": "f32", "recipe": {
        "merge_method": "passthrough",
        "slices": [{"sources": [_src("e0", 0, 3)]}, {"sources": [_src("e1", 1, 4)]}]}},
    # depth up-scaling with the repeated layers' output projections zeroed
    "passthrough_scale_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "passthrough", "dtype": "bfloat16",
        "slices": [{"sources": [_src("e0", 0, 3)]},
                   {"sources": [_src("e0", 1, 4, scale=[{"filter": "o_proj", "value": 0.0},
                                                       {"filter": "down_proj", "value": 0.0},
                                                       {"value": 1.0}])]}]}},
    "passthrough_scale_gradient_f32": {"inputs": "f32", "recipe": {
        "merge_method": "passthrough",
        "slices": [{"sources": [_src("e2", 0, 4)], "parameters": {"scale": [1.0, 0.5]}}]}},
    "passthrough_models_f32": {"inputs": "f32", "recipe": {
        "merge_method": "passthrough", "models": [_m("e1")]}},
    "passthrough_single_layer_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "passthrough",
        "slices": [{"sources": [_src("e0", 3, 4, scale=[0.25, 4.0])]}, {"sources": [_src("e1", 0, 4)]}]}},
    "uneven_sources": {"inputs": "f32", "zoo": "refuse", "match": "same number of layers", "recipe": {
        "merge_method": "linear", "parameters": {"weight": 1.0},
        "slices": [{"sources": [_src("e0", 0, 2), _src("e1", 0, 3)]}]}},
    "passthrough_two_sources": {"inputs": "f32", "zoo": "refuse", "match": "at most 1", "recipe": {
        "merge_method": "passthrough",
        "slices": [{"sources": [_src("e0", 0, 4), _src("e1", 0, 4)]}]}},
    "slerp_missing_t": {"inputs": "f32", "zoo": "refuse", "match": "no t", "recipe": {
        "merge_method": "slerp", "base_model": "{base}",
        "slices": [{"sources": [_src("base", 0, 4), _src("e0", 0, 4)]}],
        "parameters": {"t": [{"filter": "mlp", "value": [0, 1]}]}}},
}
