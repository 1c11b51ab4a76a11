"""The parity corpus's recipes for the merge methods added for issue 18 (della,
della_linear, breadcrumbs_ties, sce, ...), each run through mergekit 0.1.5 and
through ``zoo merge``; the same form as cases.py, whose ``recipe_for`` fills them in.

``zoo`` is what zoo must do: ``same`` (every tensor bit for bit); ``rounded`` (mergekit
wrote float32 tensors into a model whose config.json names a narrower dtype; zoo writes
that dtype: mergekit's values rounded once, bit for bit); ``refuse``; or ``random`` for
methods that draw at random (DELLA), compared statistically: each task vector's kept
fraction, the kept fraction among the larger and the smaller half of each row's
magnitudes, and the L1 rescale (see tests/test_mergekit_methods.py).
"""

from __future__ import annotations

from typing import Any


def _m(name: str, **params: Any) -> dict[str, Any]:
    return {"model": "{" + name + "}", **({"parameters": params} if params else {})}


CASES: dict[str, dict[str, Any]] = {
    "breadcrumbs_ties_f32": {"inputs": "f32", "recipe": {
        "merge_method": "breadcrumbs_ties", "base_model": "{base}",
        "models": [_m("e0", weight=0.5, density=0.6, gamma=0.05), _m("e1", weight=0.7, density=0.5, gamma=0.1),
                   _m("e2", weight=0.3, density=0.8)]}},
    "breadcrumbs_ties_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "breadcrumbs_ties", "base_model": "{base}", "parameters": {"normalize": True, "rescale": True},
        "models": [_m("e0", weight=0.5, density=0.5, gamma=0.1), _m("e1", weight=0.5, density=0.5, gamma=0.1)]}},
    "sce_f32": {"inputs": "f32", "recipe": {
        "merge_method": "sce", "base_model": "{base}",
        "models": [_m("e0"), _m("e1"), _m("e2")]}},
    "sce_topk_f32": {"inputs": "f32", "recipe": {
        "merge_method": "sce", "base_model": "{base}", "parameters": {"select_topk": 0.4},
        "models": [_m("e0"), _m("e1"), _m("e2")]}},
    "sce_topk_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "sce", "base_model": "{base}", "parameters": {"select_topk": 0.5},
        "models": [_m("e0"), _m("e1")]}},
    # random: one expert at weight 1, so the merged task vector is MagPrune's output itself
    "della_linear_f32": {"inputs": "f32", "zoo": "random", "recipe": {
        "merge_method": "della_linear", "base_model": "{base}",
        "models": [_m("e0", weight=1.0, density=0.5, epsilon=0.3)]}},
    "della_linear_bf16": {"inputs": "bf16", "zoo": "random", "recipe": {
        "merge_method": "della_linear", "base_model": "{base}",
        "models": [_m("e0", weight=1.0, density=0.4, epsilon=0.2)]}},
    "della_f32": {"inputs": "f32", "zoo": "random", "recipe": {
        "merge_method": "della", "base_model": "{base}",
        "models": [_m("e0", weight=1.0, density=0.6)]}},
    # della with TIES over two experts: the kept fraction of the merge, compared statistically
    "della_two_bf16": {"inputs": "bf16", "zoo": "random", "recipe": {
        "merge_method": "della", "base_model": "{base}",
        "models": [_m("e0", weight=0.5, density=0.5, epsilon=0.1), _m("e1", weight=0.5, density=0.5, epsilon=0.1)]}},
    "della_bad_epsilon": {"inputs": "f32", "zoo": "refuse", "match": r"density 0.5 \+/- epsilon 0.5", "recipe": {
        "merge_method": "della", "base_model": "{base}",
        "models": [_m("e0", weight=1.0, density=0.5, epsilon=0.5)]}},
}
CASES.update({
    "nuslerp_f32": {"inputs": "f32", "recipe": {
        "merge_method": "nuslerp", "models": [_m("e0", weight=0.3), _m("e1", weight=0.7)]}},
    "nuslerp_base_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "nuslerp", "base_model": "{base}", "models": [_m("e0", weight=0.6), _m("e1", weight=0.4)]}},
    "nuslerp_rows_f32": {"inputs": "f32", "recipe": {
        "merge_method": "nuslerp", "base_model": "{base}", "parameters": {"nuslerp_flatten": False},
        "models": [_m("e0", weight=0.5), _m("e1", weight=0.5)]}},
    "nuslerp_columns_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "nuslerp", "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        "models": [_m("e0", weight=0.2), _m("e1", weight=0.8)]}},
    "multislerp_f32": {"inputs": "f32", "recipe": {
        "merge_method": "multislerp", "models": [_m("e0", weight=0.2), _m("e1", weight=0.3), _m("e2", weight=0.5)]}},
    "multislerp_base_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "multislerp", "base_model": "{base}",
        "models": [_m("e0", weight=1.0), _m("e1", weight=2.0), _m("e2", weight=1.0)]}},
    "multislerp_base_f32": {"inputs": "f32", "recipe": {
        "merge_method": "multislerp", "base_model": "{base}", "parameters": {"normalize_weights": False},
        "models": [_m("e0", weight=0.5), _m("e1", weight=0.5)]}},
    "karcher_f32": {"inputs": "f32", "recipe": {
        "merge_method": "karcher", "models": [_m("e0"), _m("e1"), _m("e2")]}},
    "karcher_base_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "karcher", "base_model": "{base}", "parameters": {"max_iter": 5, "tol": 1e-4},
        "models": [_m("e0"), _m("e1")]}},
})
CASES.update({
    "arcee_fusion_f32": {"inputs": "f32", "recipe": {
        "merge_method": "arcee_fusion", "base_model": "{base}", "models": [_m("e0")]}},
    # mergekit writes these two's float32 results unrounded into a bfloat16 model (its
    # config.json says bfloat16); zoo writes the dtype the config names: the same values,
    # rounded once
    "arcee_fusion_bf16": {"inputs": "bf16", "zoo": "rounded", "recipe": {
        "merge_method": "arcee_fusion", "base_model": "{base}", "models": [_m("e1")]}},
    "nearswap_f32": {"inputs": "f32", "recipe": {
        "merge_method": "nearswap", "base_model": "{base}", "parameters": {"t": 0.01}, "models": [_m("e0")]}},
    "nearswap_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "nearswap", "base_model": "{base}", "parameters": {"t": 0.05}, "models": [_m("e2")]}},
    "nearswap_without_t": {"inputs": "f32", "zoo": "refuse", "match": "no t on tensor", "recipe": {
        "merge_method": "nearswap", "base_model": "{base}", "models": [_m("e0")]}},
    "ram_f32": {"inputs": "f32", "recipe": {
        "merge_method": "ram", "base_model": "{base}", "models": [_m("e0"), _m("e1"), _m("e2")]}},
    "ram_bf16": {"inputs": "bf16", "recipe": {
        "merge_method": "ram", "base_model": "{base}", "parameters": {"epsilon": 0.01},
        "models": [_m("e0"), _m("e1"), _m("e2")]}},
    "ramplus_tl_f32": {"inputs": "f32", "recipe": {
        "merge_method": "ramplus_tl", "base_model": "{base}", "parameters": {"epsilon": 0.005},
        "models": [_m("e0"), _m("e1"), _m("e2")]}},
    "ramplus_tl_bf16": {"inputs": "bf16", "zoo": "rounded", "recipe": {
        "merge_method": "ramplus_tl", "base_model": "{base}", "parameters": {"r": 0.5, "alpha": 0.5, "epsilon": 0.01},
        "models": [_m("e0"), _m("e1")]}},
})
# mergekit 0.1.5's sce, ram and ramplus_tl declare no weight: a per-model (or global)
# weight is accepted and never read, so these write what the unweighted recipes write
CASES.update({
    "sce_weight_f32": {"inputs": "f32", "recipe": {
        "merge_method": "sce", "base_model": "{base}", "parameters": {"select_topk": 0.4},
        "models": [_m("e0", weight=0.2), _m("e1", weight=0.9), _m("e2", weight=0.5)]}},
    "ram_weight_f32": {"inputs": "f32", "recipe": {
        "merge_method": "ram", "base_model": "{base}", "parameters": {"weight": 0.3},
        "models": [_m("e0", weight=0.7), _m("e1"), _m("e2", weight=2.0)]}},
    "ramplus_tl_weight_f32": {"inputs": "f32", "recipe": {
        "merge_method": "ramplus_tl", "base_model": "{base}", "parameters": {"epsilon": 0.005},
        "models": [_m("e0", weight=0.1), _m("e1", weight=0.6), _m("e2", weight=0.3)]}},
})
