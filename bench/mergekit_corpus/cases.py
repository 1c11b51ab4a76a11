"""The parity corpus's recipes: one or more per divergence of mergekit's semantics that
zoo once had (issue 18), each run through mergekit 0.1.5 and through ``zoo merge``.

A recipe names its inputs as ``{base}``, ``{e0}``, ``{e1}``, ``{e2}``; ``inputs`` says
which family (``f32`` or ``bf16``, see inputs.py) fills them in. ``zoo`` is what zoo
must do: ``same`` (every tensor bit for bit as mergekit wrote it), or ``refuse`` with a
line matching ``match`` (mergekit refuses too, or writes something no one wants).
"""

from __future__ import annotations

import copy
from typing import Any


def _m(name: str, **params: Any) -> dict[str, Any]:
    return {"model": "{" + name + "}", **({"parameters": params} if params else {})}


CASES: dict[str, dict[str, Any]] = {
    # 1. linear with base_model averages the base too (its weight from the global parameters)
    "linear_base_f32": {"inputs": "f32", "recipe": {
        "merge_method": "linear", "base_model": "{base}", "parameters": {"weight": 0.3},
        "models": [_m("e0", weight=0.7)]}},
    "linear_base_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "linear", "base_model": "{base}", "parameters": {"weight": 0.2},
        "models": [_m("e0", weight=0.5), _m("e1", weight=0.3)]}},
    "linear_listed_base_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "linear", "base_model": "{base}",
        "models": [_m("e0", weight=0.5), _m("base", weight=0.25), _m("e1", weight=0.25)]}},
    # 2. defaults: dare_* normalize false, rescale true; ties normalize true (no drop at density 1)
    "dare_ties_defaults_f32": {"inputs": "f32", "recipe": {
        "merge_method": "dare_ties", "base_model": "{base}", "models": [_m("e0", weight=0.6), _m("e1", weight=0.8)]}},
    "dare_linear_defaults_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "dare_linear", "base_model": "{base}",
        "models": [_m("e0", weight=0.6), _m("e1", weight=0.8), _m("e2", weight=0.3)]}},
    "ties_defaults_f32": {"inputs": "f32", "recipe": {
        "merge_method": "ties", "base_model": "{base}",
        "models": [_m("e0", weight=0.5, density=0.5), _m("e1", weight=0.3, density=0.3),
                   _m("e2", weight=0.7, density=0.7)]}},
    # 3. tokenizer_source: a model, base, union (same vocabularies: no embedding row moves)
    "tokenizer_model_f32": {"inputs": "f32", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "tokenizer_source": "{e2}",
        "models": [_m("e0", weight=0.5), _m("e2", weight=0.5)]}},
    "tokenizer_base_f32": {"inputs": "f32", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "tokenizer_source": "base",
        "models": [_m("e0", weight=0.5), _m("e2", weight=0.5)]}},
    "tokenizer_union_f32": {"inputs": "f32", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "tokenizer_source": "union",
        "models": [_m("e0", weight=0.5), _m("e2", weight=0.5)]}},
    # 4. TIES rescale: true (L1 rescale of each trimmed task vector)
    "ties_rescale_f32": {"inputs": "f32", "recipe": {
        "merge_method": "ties", "base_model": "{base}", "parameters": {"rescale": True},
        "models": [_m("e0", weight=0.5, density=0.4), _m("e1", weight=0.5, density=0.4)]}},
    "ties_rescale_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "ties", "base_model": "{base}", "parameters": {"rescale": True},
        "models": [_m("e0", weight=0.5, density=0.4), _m("e1", weight=0.5, density=0.4)]}},
    # 5. bfloat16 density: exactly k kept, ties at the cut-off broken as mergekit's sort does
    "ties_density_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "ties", "base_model": "{base}",
        "models": [_m("e0", weight=0.5, density=0.5), _m("e1", weight=0.3, density=0.5),
                   _m("e2", weight=0.7, density=0.5)]}},
    "breadcrumbs_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "breadcrumbs", "base_model": "{base}",
        "models": [_m("e0", weight=0.5, density=0.5, gamma=0.1), _m("e1", weight=0.5, density=0.5, gamma=0.1)]}},
    "breadcrumbs_f32": {"inputs": "f32", "recipe": {
        "merge_method": "breadcrumbs", "base_model": "{base}",
        "models": [_m("e0", weight=0.5, density=0.6, gamma=0.05), _m("e1", weight=0.5, density=0.6, gamma=0.05)]}},
    # 6. a missing weight, or a conditional list with no entry for some tensor: refused
    "missing_weight": {"inputs": "f32", "zoo": "refuse", "match": "no weight for", "recipe": {
        "merge_method": "ties", "base_model": "{base}", "models": [_m("e0", weight=0.5), _m("e1", density=0.5)]}},
    "conditional_without_catch_all": {"inputs": "f32", "zoo": "refuse", "match": "no weight for", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}",
        "models": [_m("e0", weight=[{"filter": "self_attn", "value": 0.5}]), _m("e1", weight=0.5)]}},
    "slerp_without_t": {"inputs": "f32", "zoo": "refuse", "match": "no t on tensor", "recipe": {
        "merge_method": "slerp", "base_model": "{base}", "models": [_m("e0")]}},
    # 7. filter "*" is the wildcard; a non-matching list falls through to the global parameters
    "filter_star_f32": {"inputs": "f32", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}",
        "models": [_m("e0", weight=[{"filter": "mlp", "value": 0.2}, {"filter": "*", "value": 0.7}]),
                   _m("e1", weight=[{"filter": "self_attn", "value": 0.4}])],
        "parameters": {"weight": 0.9}}},
    # 8. dtype is the compute and the saved dtype
    "dtype_bf16_on_f32": {"inputs": "f32", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "dtype": "bfloat16",
        "models": [_m("e0", weight=0.3), _m("e1", weight=0.3), _m("e2", weight=0.3)]}},
    "dtype_f32_on_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "ties", "base_model": "{base}", "dtype": "float32",
        "models": [_m("e0", weight=0.5, density=0.5), _m("e1", weight=0.5, density=0.5)]}},
    # 9. out_dtype: the saved dtype, and config.json names it
    "out_dtype_bf16": {"inputs": "f32", "recipe": {
        "merge_method": "ties", "base_model": "{base}", "out_dtype": "bfloat16",
        "models": [_m("e0", weight=0.5, density=0.5), _m("e1", weight=0.5, density=0.5)]}},
    "dtype_f16_out_f32": {"inputs": "bf16", "recipe": {
        "merge_method": "linear", "dtype": "float16", "out_dtype": "float32",
        "models": [_m("e0", weight=1.0), _m("e1", weight=2.0)]}},
    # 10. bfloat16/float16 arithmetic: linear in float32 rounded once; task arithmetic in the
    #     compute dtype with its weights rounded to it
    "linear_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "linear",
        "models": [_m("e0", weight=0.3), _m("e1", weight=0.3), _m("e2", weight=0.4)]}},
    "task_arithmetic_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "parameters": {"lambda": 0.7, "normalize": True},
        "models": [_m("e0", weight=0.3), _m("e1", weight=0.3), _m("e2", weight=0.3)]}},
    "task_arithmetic_f16": {"inputs": "f32", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}", "dtype": "float16",
        "models": [_m("e0", weight=0.3), _m("e1", weight=0.7), _m("e2", weight=0.1)]}},
    "task_arithmetic_f32": {"inputs": "f32", "recipe": {
        "merge_method": "task_arithmetic", "base_model": "{base}",
        "models": [_m("e0", weight=0.3), _m("e1", weight=0.7), _m("e2", weight=0.1)]}},
    # 11. linear weights summing to zero: mergekit writes NaN; zoo refuses
    "linear_zero_sum": {"inputs": "f32", "zoo": "refuse", "match": "sum to 0", "recipe": {
        "merge_method": "linear", "models": [_m("e0", weight=1.0), _m("e1", weight=-1.0)]}},
    # 12. density x size below 1 keeps one entry
    "ties_tiny_density_f32": {"inputs": "f32", "recipe": {
        "merge_method": "ties", "base_model": "{base}",
        "models": [_m("e0", weight=0.5, density=0.01), _m("e1", weight=0.5, density=0.01)]}},
    # cheap features: int8_mask (no numeric change), global weight/density for every model
    "int8_mask_f32": {"inputs": "f32", "recipe": {
        "merge_method": "ties", "base_model": "{base}", "parameters": {"int8_mask": True},
        "models": [_m("e0", weight=0.5, density=0.5), _m("e1", weight=0.5, density=0.5)]}},
    "global_weight_density_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "ties", "base_model": "{base}", "parameters": {"weight": 0.4, "density": 0.6},
        "models": [_m("e0"), _m("e1", density=0.3), _m("e2")]}},
}


def recipe_for(case: dict[str, Any], root: str) -> dict[str, Any]:
    """The case's recipe with its inputs' paths under ``root`` filled in."""
    paths = {k: f"{root}/{case['inputs']}/{k}" for k in ("base", "e0", "e1", "e2")}

    def fill(x: Any) -> Any:
        if isinstance(x, str):
            return x.format(**paths) if x.startswith("{") and x.endswith("}") else x
        if isinstance(x, list):
            return [fill(v) for v in x]
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        return x

    return fill(copy.deepcopy(case["recipe"]))
