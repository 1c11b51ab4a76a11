"""The corpus's recipes, run through mergekit 0.1.5 and ``zoo merge`` by run_corpus.py.

Sources: the recipes of mergekit's ``examples/`` (linear, ties with gradients,
bio-merge, gradient-slerp, the 44-layer frankenmerge, arcee_fusion) and the configs of
its ``tests/test_basic_merges.py`` (two experts with weights 0.6/0.4 in bfloat16, one
per method), rewritten onto the tiny families of families.py; the parity cases of
cases.py; and edge cases: bf16 inputs, magnitude ties, missing weights, wildcards,
dtype combinations, sharded inputs, GPT-2's Conv1D and tied embeddings, tokenizers that
differ, a ``model+lora`` reference. Models are written ``{e0}`` (that model of the recipe's family) or
``{llama-bf16/e0}`` (another family's).
"""

from __future__ import annotations

import copy
from typing import Any

from cases import CASES

FAMILIES = [f"{a}-{d}" for a in ("llama", "mistral", "gpt2") for d in ("f32", "bf16")]
RANDOM_METHODS = {"dare_ties", "dare_linear", "della", "della_linear"}


def _m(name: str, **params: Any) -> dict[str, Any]:
    return {"model": "{" + name + "}", **({"parameters": params} if params else {})}


def _src(name: str, a: int, b: int) -> dict[str, Any]:
    return {"model": "{" + name + "}", "layer_range": [a, b]}


RECIPES: dict[str, dict[str, Any]] = {}


def add(name: str, family: str, recipe: dict[str, Any], source: str) -> None:
    assert name not in RECIPES, name
    RECIPES[name] = {"family": family, "source": source, "recipe": recipe}


# --- mergekit examples/ ---------------------------------------------------------------
for fam in ("llama-f32", "mistral-bf16", "gpt2-f32"):
    add(f"ex_linear.{fam}", fam, {"merge_method": "linear", "dtype": "float16", "models": [
        _m("e0", weight=1.0), _m("e1", weight=0.3), _m("e2", weight=0.5)]}, "examples/linear.yml")
    add(f"ex_ties.{fam}", fam, {"merge_method": "ties", "base_model": "{base}", "dtype": "float16",
                                "parameters": {"normalize": True, "int8_mask": True}, "models": [
        _m("e0", density=[1, 0.7, 0.1], weight=1.0), _m("e1", density=0.5, weight=[0, 0.3, 0.7, 1]),
        _m("e2", density=0.33, weight=[{"filter": "mlp", "value": 0.5}, {"value": 0}])]}, "examples/ties.yml")
    add(f"ex_gradient_slerp.{fam}", fam, {"merge_method": "slerp", "base_model": "{base}", "dtype": "float16",
                                          "slices": [{"sources": [_src("base", 0, 4), _src("e0", 0, 4)]}],
                                          "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                                               {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                                               {"value": 0.5}]}}, "examples/gradient-slerp.yml")
    add(f"ex_gradient_slerp_models.{fam}", fam, {"merge_method": "slerp", "base_model": "{base}", "dtype": "float16",
                                                 "models": [_m("base"), _m("e0")],
                                                 "parameters": {"t": [{"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
                                                                      {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
                                                                      {"value": 0.5}]}},
        "examples/gradient-slerp.yml (models: syntax)")
    add(f"ex_frankenmerge.{fam}", fam, {"merge_method": "passthrough", "dtype": "float16", "slices": [
        {"sources": [_src("e0", 0, 3)]}, {"sources": [_src("e1", 1, 4)]}]}, "examples/orcamini-platy-44layer.yml")
for fam in ("llama-bf16", "mistral-f32"):
    add(f"ex_bio_merge.{fam}", fam, {"merge_method": "ties", "base_model": "{base}", "dtype": "float16",
                                     "parameters": {"normalize": False, "int8_mask": True}, "models": [
        _m("e0", density=0.5, weight=0.5), _m("e1", density=0.5, weight=0.5)]}, "examples/bio-merge.yml")
    add(f"ex_arcee_fusion.{fam}", fam, {"merge_method": "arcee_fusion", "base_model": "{base}", "dtype": "bfloat16",
                                        "models": [_m("base"), _m("e0")]}, "examples/arcee_fusion.yml")

# --- mergekit tests/test_basic_merges.py ------------------------------------------------
def _two(method: str, base: str | None = None, params: dict | None = None, third: bool = False) -> dict[str, Any]:
    r: dict[str, Any] = {"merge_method": method, "dtype": "bfloat16",
                         "models": [_m("e0", weight=0.6), _m("e1", weight=0.4)]}
    if base:
        r["base_model"] = "{" + base + "}"
    if params:
        r["parameters"] = params
    return r


TESTS = {
    "linear": _two("linear"),
    "slerp": {"merge_method": "slerp", "base_model": "{e0}", "dtype": "bfloat16", "parameters": {"t": 0.35},
              "models": [_m("e0"), _m("e1")]},
    "nuslerp": _two("nuslerp", "base"),
    "nuslerp_nobase": _two("nuslerp"),
    "nuslerp_zero_sum": {"merge_method": "nuslerp", "dtype": "bfloat16",
                         "models": [_m("e0", weight=-0.5), _m("e1", weight=0.5)]},
    "task_arithmetic": _two("task_arithmetic", "base"),
    "breadcrumbs": _two("breadcrumbs", "base"),
    "ties": _two("ties", "base", {"density": 0.3}),
    "sce": _two("sce", "base", {"select_topk": 0.5}),
    "ram": _two("ram", "base"),
    "ramplus_tl": _two("ramplus_tl", "base"),
    "multislerp": _two("multislerp", "base"),
    "dare_ties": _two("dare_ties", "base", {"density": 0.66}),
    "model_stock": {"merge_method": "model_stock", "base_model": "{base}", "dtype": "bfloat16",
                    "models": [_m("e0"), _m("e1")]},
    "model_stock_filter_wise": {"merge_method": "model_stock", "base_model": "{base}", "dtype": "bfloat16",
                                "parameters": {"filter_wise": True}, "models": [_m("e0"), _m("e1")]},
    "arcee_fusion": {"merge_method": "arcee_fusion", "base_model": "{e0}", "dtype": "bfloat16",
                     "models": [_m("e0"), _m("e1")]},
    "nearswap": {"merge_method": "nearswap", "base_model": "{e0}", "dtype": "bfloat16", "parameters": {"t": 0.0001},
                 "models": [_m("e0"), _m("e1")]},
    "della": _two("della", "base", {"density": 0.66, "epsilon": 0.05, "lambda": 0.5}),
    "della_invalid_epsilon": _two("della", "base", {"density": 0.66, "epsilon": 1.35, "lambda": 0.5}),
    "karcher": {"merge_method": "karcher", "dtype": "bfloat16", "models": [_m("e0"), _m("e1"), _m("e2")]},
    "passthrough_copy": {"merge_method": "passthrough", "dtype": "bfloat16", "models": [_m("e0")]},
    "passthrough_stack": {"merge_method": "passthrough", "dtype": "bfloat16",
                          "slices": [{"sources": [_src("e0", 0, 4)]}, {"sources": [_src("e0", 0, 4)]}]},
    "passthrough_scale": {"merge_method": "passthrough", "dtype": "bfloat16", "models": [
        {"model": "{e0}", "parameters": {"scale": [{"filter": "o_proj", "value": 0}, {"value": 1}]}}]},
}
for method, recipe in TESTS.items():
    for fam in ("llama-f32", "mistral-bf16", "gpt2-bf16"):
        add(f"t_{method}.{fam}", fam, copy.deepcopy(recipe), "tests/test_basic_merges.py")

# --- mergekit docs/merge_methods.md: each method with its documented parameters ---------
DOCS = {
    "dare_linear": _two("dare_linear", "base", {"density": 0.5}),
    "breadcrumbs_ties": _two("breadcrumbs_ties", "base", {"density": 0.9, "gamma": 0.01}),
    "della_linear": _two("della_linear", "base", {"density": 0.5, "epsilon": 0.1, "lambda": 1.0}),
    "nuslerp_rowwise": _two("nuslerp", "base", {"nuslerp_row_wise": True, "nuslerp_flatten": False}),
    "multislerp_unnormalized": _two("multislerp", None, {"normalize_weights": False}),
    "task_arithmetic_lambda": _two("task_arithmetic", "base", {"lambda": 0.5}),
    "linear_no_normalize": _two("linear", None, {"normalize": False}),
    "sce_full": _two("sce", "base"),
}
for method, recipe in DOCS.items():
    for fam in ("llama-bf16", "gpt2-f32"):
        add(f"d_{method}.{fam}", fam, copy.deepcopy(recipe), "docs/merge_methods.md")

# --- the parity cases (cases.py) on the one-layer family --------------------------------
for name, case in CASES.items():
    add(f"p_{name}", "parity-" + case["inputs"], copy.deepcopy(case["recipe"]), "cases.py (issue 18 divergences)")

# --- edge cases ---------------------------------------------------------------------------
EDGE = {
    "sharded_input": ("llama-f32", {"merge_method": "task_arithmetic", "base_model": "{base}",
                                    "models": [_m("s0", weight=0.5), _m("e1", weight=0.5)]}),
    "sharded_base_bf16": ("mistral-bf16", {"merge_method": "linear", "models": [_m("s0", weight=0.5),
                                                                                 _m("e1", weight=0.5)]}),
    "ties_magnitude_ties_f32": ("llama-f32", {"merge_method": "ties", "base_model": "{base}", "models": [
        _m("q0", weight=0.5, density=0.5), _m("q1", weight=0.5, density=0.5)]}),
    "breadcrumbs_magnitude_ties_f32": ("llama-f32", {"merge_method": "breadcrumbs", "base_model": "{base}", "models": [
        _m("q0", weight=0.5, density=0.5, gamma=0.1), _m("q1", weight=0.5, density=0.5, gamma=0.1)]}),
    "ties_magnitude_ties_bf16": ("mistral-bf16", {"merge_method": "ties", "base_model": "{base}", "models": [
        _m("q0", weight=0.5, density=0.3), _m("q1", weight=0.5, density=0.7)]}),
    "missing_weight_linear": ("llama-f32", {"merge_method": "linear", "models": [_m("m0", weight=0.5),
                                                                                  _m("e1", weight=0.5)]}),
    "missing_weight_ties": ("gpt2-f32", {"merge_method": "ties", "base_model": "{base}", "models": [
        _m("m0", weight=0.5, density=0.5), _m("e1", weight=0.5, density=0.5)]}),
    "missing_weight_param": ("llama-bf16", {"merge_method": "task_arithmetic", "base_model": "{base}",
                                            "models": [_m("e0", weight=0.5), _m("e1")]}),
    "wildcard_only": ("mistral-f32", {"merge_method": "task_arithmetic", "base_model": "{base}", "models": [
        _m("e0", weight=[{"filter": "*", "value": 0.4}]), _m("e1", weight=0.6)]}),
    "wildcard_after_filters": ("gpt2-bf16", {"merge_method": "linear", "models": [
        _m("e0", weight=[{"filter": "attn", "value": 0.2}, {"filter": "*", "value": 0.8}]), _m("e1", weight=0.5)]}),
    "glob_is_literal": ("llama-f32", {"merge_method": "task_arithmetic", "base_model": "{base}",
                                      "parameters": {"weight": 0.3}, "models": [
        _m("e0", weight=[{"filter": "layers.*.mlp", "value": 0.9}]), _m("e1")]}),
    "global_weight_catch_all": ("gpt2-f32", {"merge_method": "ties", "base_model": "{base}",
                                             "parameters": {"weight": 0.5, "density": 0.4},
                                             "models": [_m("e0"), _m("e1"), _m("e2")]}),
    "dtype_bf16_on_f32": ("gpt2-f32", {"merge_method": "slerp", "base_model": "{base}", "dtype": "bfloat16",
                                       "parameters": {"t": 0.3}, "models": [_m("base"), _m("e0")]}),
    "dtype_f16_on_bf16": ("llama-bf16", {"merge_method": "task_arithmetic", "base_model": "{base}",
                                         "dtype": "float16", "models": [_m("e0", weight=0.5), _m("e1", weight=0.5)]}),
    "dtype_f32_out_bf16": ("mistral-f32", {"merge_method": "linear", "dtype": "float32", "out_dtype": "bfloat16",
                                           "models": [_m("e0", weight=0.5), _m("e1", weight=0.5)]}),
    "dtype_torch_prefix": ("llama-f32", {"merge_method": "linear", "dtype": "torch.bfloat16",
                                         "models": [_m("e0", weight=0.5), _m("e1", weight=0.5)]}),
    "dtype_float64": ("llama-f32", {"merge_method": "task_arithmetic", "base_model": "{base}", "dtype": "float64",
                                    "out_dtype": "float32", "models": [_m("e0", weight=0.5), _m("e1", weight=0.5)]}),
    "dtype_unknown": ("llama-f32", {"merge_method": "linear", "dtype": "float8",
                                    "models": [_m("e0", weight=0.5), _m("e1", weight=0.5)]}),
    "mixed_bf16_f16_inputs": ("llama-bf16", {"merge_method": "linear",
                                             "models": [_m("h0", weight=0.5), _m("e1", weight=0.5)]}),
    "mixed_bf16_f16_ties": ("llama-bf16", {"merge_method": "ties", "base_model": "{base}", "models": [
        _m("h0", weight=0.5, density=0.5), _m("e1", weight=0.5, density=0.5)]}),
    "mixed_f32_bf16_inputs": ("llama-f32", {"merge_method": "task_arithmetic", "base_model": "{base}",
                                            "models": [_m("llama-bf16/e0", weight=0.5), _m("e1", weight=0.5)]}),
    "gpt2_conv1d_ties_bf16": ("gpt2-bf16", {"merge_method": "ties", "base_model": "{base}", "models": [
        _m("e0", weight=0.5, density=0.3), _m("e1", weight=0.5, density=0.6), _m("e2", weight=0.5, density=0.9)]}),
    "gpt2_tied_slerp_f32": ("gpt2-f32", {"merge_method": "slerp", "base_model": "{base}", "parameters": {"t": 0.7},
                                         "models": [_m("base"), _m("e1")]}),
    "gpt2_task_arithmetic_f32": ("gpt2-f32", {"merge_method": "task_arithmetic", "base_model": "{base}", "models": [
        _m("e0", weight=0.3), _m("e1", weight=0.3), _m("e2", weight=0.3)]}),
    "gpt2_layer_gradient_linear": ("gpt2-f32", {"merge_method": "linear", "models": [
        _m("e0", weight=[1, 0]), _m("e1", weight=[0, 1])]}),
    "tokenizer_union_differs": ("llama-f32", {"merge_method": "linear", "base_model": "{base}",
                                              "tokenizer_source": "union", "parameters": {"weight": 0.5},
                                              "models": [_m("t0")]}),
    "tokenizer_base_differs": ("llama-f32", {"merge_method": "task_arithmetic", "base_model": "{base}",
                                             "tokenizer_source": "base", "models": [_m("t0", weight=0.5)]}),
    "tokenizer_model_differs": ("llama-bf16", {"merge_method": "task_arithmetic", "base_model": "{base}",
                                               "tokenizer_source": "{t0}", "models": [_m("t0", weight=0.5),
                                                                                      _m("e1", weight=0.5)]}),
    "tokenizer_none_differs": ("mistral-f32", {"merge_method": "task_arithmetic", "base_model": "{base}",
                                               "models": [_m("t0", weight=0.5), _m("e1", weight=0.5)]}),
    "tokenizer_block": ("llama-f32", {"merge_method": "linear", "tokenizer": {"source": "base"},
                                      "base_model": "{base}", "parameters": {"weight": 0.5}, "models": [_m("e0")]}),
    "chat_template_chatml": ("llama-f32", {"merge_method": "linear", "tokenizer_source": "base",
                                           "chat_template": "chatml", "base_model": "{base}",
                                           "parameters": {"weight": 0.5}, "models": [_m("e0")]}),
    "tokenizer_union_pad_tokens_bf16": ("llama-bf16", {
        "merge_method": "ties", "base_model": "{base}",
        "tokenizer": {"source": "union", "pad_to_multiple_of": 48, "tokens": {"<extra>": {"source": {"kind": "zero"}}}},
        "models": [_m("t0", weight=0.5, density=0.5), _m("e1", weight=0.5, density=0.5)]}),
    "tokenizer_union_gpt2_tied": ("gpt2-f32", {"merge_method": "task_arithmetic", "base_model": "{base}",
                                               "tokenizer_source": "union",
                                               "models": [_m("t0", weight=0.5), _m("e1", weight=0.5)]}),
    "chat_template_literal": ("mistral-f32", {
        "merge_method": "linear", "base_model": "{base}", "parameters": {"weight": 0.5},
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}\n",
        "models": [_m("e0")]}),
    "slerp_slices_gradient_bf16": ("llama-bf16", {"merge_method": "slerp", "base_model": "{base}", "slices": [
        {"sources": [_src("base", 0, 2), _src("e0", 0, 2)]}, {"sources": [_src("base", 2, 4), _src("e0", 2, 4)]}],
        "parameters": {"t": [0, 1]}}),
    "ties_density_gradient_bf16": ("mistral-bf16", {"merge_method": "ties", "base_model": "{base}", "models": [
        _m("e0", weight=0.5, density=[0.2, 0.8]), _m("e1", weight=0.5, density=[0.8, 0.2])]}),
    "passthrough_scale_slices": ("llama-f32", {"merge_method": "passthrough", "slices": [
        {"sources": [_src("e0", 0, 2)], "parameters": {"scale": 0.5}}, {"sources": [_src("e1", 2, 4)]}]}),
    "lora_syntax": ("llama-f32", {"merge_method": "linear", "models": [
        {"model": "{e0}+{l0}", "parameters": {"weight": 0.5}}, _m("e1", weight=0.5)]}),
    "lora_syntax_bf16": ("llama-bf16", {"merge_method": "task_arithmetic", "base_model": "{base}", "models": [
        {"model": "{base}+{l0}", "parameters": {"weight": 1.0}}]}),
    "modules_block": ("llama-f32", {"merge_method": "linear", "modules": {"default": {
        "models": [_m("e0", weight=0.5), _m("e1", weight=0.5)]}}}),
    "single_model_linear_bf16": ("gpt2-bf16", {"merge_method": "linear", "models": [_m("e2", weight=1.0)]}),
    "dare_ties_rescale_false": ("llama-f32", {"merge_method": "dare_ties", "base_model": "{base}",
                                              "parameters": {"rescale": False}, "models": [
        _m("e0", weight=0.5, density=0.5), _m("e1", weight=0.5, density=0.5)]}),
    "dare_linear_f32_density_03": ("mistral-f32", {"merge_method": "dare_linear", "base_model": "{base}", "models": [
        _m("e0", weight=0.5, density=0.3), _m("e1", weight=0.5, density=0.3)]}),
    "ties_density_zero": ("llama-f32", {"merge_method": "ties", "base_model": "{base}", "models": [
        _m("e0", weight=0.5, density=0.0), _m("e1", weight=0.5, density=0.5)]}),
    "ties_negative_weight": ("gpt2-bf16", {"merge_method": "ties", "base_model": "{base}", "models": [
        _m("e0", weight=-0.5, density=0.5), _m("e1", weight=1.0, density=0.5)]}),
}
for name, (fam, recipe) in EDGE.items():
    add(f"x_{name}", fam, recipe, "edge case")


def fill(recipe: dict[str, Any], root: str, family: str) -> dict[str, Any]:
    """The recipe with ``{e0}`` / ``{fam/e0}`` replaced by the input folders under ``root``."""
    def path(ref: str) -> str:
        return "+".join(f"{root}/{p if '/' in p else family + '/' + p}" for p in ref.strip("{}").split("}+{"))

    def go(x: Any) -> Any:
        if isinstance(x, str):
            return path(x) if x.startswith("{") and x.endswith("}") else x
        if isinstance(x, list):
            return [go(v) for v in x]
        if isinstance(x, dict):
            return {k: go(v) for k, v in x.items()}
        return x

    return go(copy.deepcopy(recipe))
