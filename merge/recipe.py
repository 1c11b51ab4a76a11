"""Merge recipes: mergekit's YAML format, and the same recipe built from CLI flags.

Accepted mergekit fields: ``merge_method``, ``base_model``, ``models[].model``,
``models[].parameters`` (``weight``, ``density``, ...), global ``parameters`` (which
also hold per-model parameters for every model that does not set them), ``dtype``
(the compute dtype, and the saved one unless ``out_dtype`` is given), ``out_dtype``,
``tokenizer_source`` or the ``tokenizer:`` block (merge/vocab.py), ``chat_template``
(merge/chat_template.py), and ``MODEL+ADAPTER`` model references (merge/lora_ref.py).
A parameter is a number, or a list of ``{filter: SUBSTRING,
value: V}`` conditionals where the first whose filter is in the tensor name wins (a
conditional without ``filter``, or with ``filter: "*"``, matches every tensor; when
none matches, the global parameters answer). zoo adds ``seed`` (for DARE) and
``heads`` (patterns of task-specific tensors).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from zoo.checkpoints.heads import DEFAULT_HEAD_PATTERNS
from zoo.errors import ZooError

from zoo.merge.chat_template import check as check_chat_template
from zoo.merge.methods import check_count, get_method, validate_params
from zoo.merge.methods.base import LOOP_PARAMETERS

DTYPES = ("float32", "float16", "bfloat16", "float64")
UNSUPPORTED = ("slices", "modules")


@dataclass
class ModelSpec:
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recipe:
    merge_method: str
    models: list[ModelSpec]
    base_model: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    dtype: str | None = None  # None: each tensor is computed in its stored dtype (mergekit's default)
    out_dtype: str | None = None  # None: dtype, else each tensor keeps the base's dtype
    seed: int = 0
    heads: list[str] = field(default_factory=lambda: list(DEFAULT_HEAD_PATTERNS))
    tokenizer_source: str | None = None
    tokenizer: dict[str, Any] | None = None  # mergekit's tokenizer: block (merge/vocab.py)
    chat_template: str | None = None  # auto or a Jinja template (merge/chat_template.py)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = [{"model": m.model, "parameters": m.parameters} for m in self.models]
        return d

    def validate(self) -> None:
        """Refuse unknown methods and parameters and bad values before any work."""
        method = get_method(self.merge_method)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ZooError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.out_dtype is not None and self.out_dtype not in DTYPES:
            raise ZooError(f"out_dtype {self.out_dtype!r} is not one of {', '.join(DTYPES)}")
        if method.needs_base and not self.base_model:
            raise ZooError(f"{self.merge_method} needs a base model (base_model / --base)")
        if not self.models:
            raise ZooError("the recipe names no models to merge")
        check_count(method, len(self.models))
        if self.tokenizer_source is not None and (not isinstance(self.tokenizer_source, str)
                                                  or not self.tokenizer_source):
            raise ZooError("tokenizer_source must be base, union or the name of a merged model")
        check_tokenizer(self.tokenizer_source, self.tokenizer)
        check_chat_template(self.chat_template)
        shared, catch_all = split_globals(method, self.parameters)
        validate_params(method, _all_values(shared, "parameters"),
                        [_all_values(catch_all, "parameters")]
                        + [_all_values(m.parameters, f"parameters of {m.model}") for m in self.models])
        # Conditionals: check every value they can take.
        for spec, is_global in [(shared, True), (catch_all, False), *((m.parameters, False) for m in self.models)]:
            for key, value in spec.items():
                if isinstance(value, list):
                    for cond in value:
                        probe = {key: cond["value"]}
                        if is_global:
                            validate_params(method, probe, [])
                        else:
                            validate_params(method, {}, [probe])


def check_tokenizer(source: Any, block: Any) -> None:
    """The ``tokenizer:`` block's shape, as mergekit's schema has it."""
    if block is None:
        return
    if source is not None:
        raise ZooError("give tokenizer_source or a tokenizer: block, not both (mergekit refuses both)")
    if not isinstance(block, dict) or set(block) - {"source", "tokens", "pad_to_multiple_of"}:
        raise ZooError("tokenizer: must be a mapping of source, tokens and pad_to_multiple_of")
    if not isinstance(block.get("source", "union"), str) or not block.get("source", "union"):
        raise ZooError("tokenizer.source must be union, base or the name of a merged model")
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (not isinstance(pad, int) or isinstance(pad, bool) or pad < 1):
        raise ZooError("tokenizer.pad_to_multiple_of must be a positive integer")
    tokens = block.get("tokens") or {}
    if not isinstance(tokens, dict):
        raise ZooError("tokenizer.tokens must map each token to {source, force}")
    for tok, spec in tokens.items():
        if not isinstance(spec, dict) or set(spec) - {"source", "force"}:
            raise ZooError(f"tokenizer.tokens.{tok}: expected {{source, force}}")
        src = spec.get("source")
        if isinstance(src, dict):
            kind = src.get("kind")
            if kind == "zero" and set(src) == {"kind"}:
                continue
            if kind != "model_token" or not isinstance(src.get("model"), str) \
                    or set(src) - {"kind", "model", "token_id", "token"} \
                    or (src.get("token_id") is None) == (src.get("token") is None):
                raise ZooError(f"tokenizer.tokens.{tok}.source: expected a model, {{kind: zero}} or "
                               "{kind: model_token, model, token_id or token (exactly one)}")
        elif src is not None and not isinstance(src, str):
            raise ZooError(f"tokenizer.tokens.{tok}.source: expected a model name")


def split_globals(method: Any, params: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The global parameters as (the method's own, per-model ones given for every model):
    mergekit looks a model's parameter up in its own entry, then in the global ones."""
    catch_all = {k: v for k, v in params.items() if k in method.model_parameters and k not in method.parameters}
    return {k: v for k, v in params.items() if k not in catch_all}, catch_all


def _all_values(params: dict[str, Any], where: str) -> dict[str, Any]:
    """Parameters with conditionals reduced to their first value, for validation."""
    out = {}
    for key, value in params.items():
        if isinstance(value, list):
            if not value:
                raise ZooError(f"{where}: {key} is an empty list")
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                raise ZooError(f"{where}: {key} is a gradient (a list of numbers over layers); zoo does not "
                               "support gradients yet: give a number or {filter, value} conditionals")
            for cond in value:
                if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
                    raise ZooError(f"{where}: {key} conditionals must be {{filter: SUBSTRING, value: V}} items")
            out[key] = value[0]["value"]
        else:
            out[key] = value
    return out


def resolve(params: dict[str, Any], tensor: str) -> dict[str, Any]:
    """The value each parameter takes for one tensor; a conditional list where nothing
    matches leaves the parameter out (mergekit then asks the next scope)."""
    out = {}
    for key, value in params.items():
        if isinstance(value, list):
            for cond in value:
                f = cond.get("filter")
                if f is None or f == "*" or f in tensor:  # "*" is mergekit's wildcard, not a substring
                    out[key] = cond["value"]
                    break
        else:
            out[key] = value
    return out


def _model_ref(entry: Any) -> str:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("model"), str):
        return entry["model"]
    raise ZooError(f"cannot read model reference {entry!r}: expected a name or path")


def from_dict(data: dict[str, Any]) -> Recipe:
    if not isinstance(data, dict):
        raise ZooError("a recipe must be a YAML mapping")
    for key in UNSUPPORTED:
        if key in data:
            raise ZooError(f"recipe field {key!r} is not supported yet; use merge_method, base_model and models")
    known = {"merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "seed", "heads",
             "tokenizer_source", "tokenizer", "chat_template", "name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ZooError(f"unknown recipe field(s): {', '.join(unknown)}")
    if "merge_method" not in data:
        raise ZooError("the recipe has no merge_method")
    models = []
    if not isinstance(data.get("models") or [], list):
        raise ZooError(f"models must be a list of {{model: NAME}} entries, got {data['models']!r}; e.g. "
                       "models: [{model: expert1}, {model: expert2}]")
    for entry in data.get("models") or []:
        if not isinstance(entry, dict) or "model" not in entry:
            raise ZooError(f"each models entry needs a 'model' key, got {entry!r}")
        params = entry.get("parameters") or {}
        if not isinstance(params, dict):
            raise ZooError(f"parameters of {entry['model']} must be a mapping")
        models.append(ModelSpec(_model_ref(entry["model"]), dict(params)))
    base = data.get("base_model")
    if base is not None:
        base = _model_ref(base)
        models = place_base(str(data["merge_method"]) if "merge_method" in data else "", models, base)
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ZooError("seed must be an integer")
    recipe = Recipe(
        merge_method=str(data["merge_method"]), models=models, base_model=base,
        parameters=dict(data.get("parameters") or {}), dtype=_dtype_name(data.get("dtype")),
        out_dtype=_dtype_name(data.get("out_dtype")), seed=seed,
        heads=list(data.get("heads") or DEFAULT_HEAD_PATTERNS), tokenizer_source=data.get("tokenizer_source"),
        tokenizer=data.get("tokenizer"), chat_template=data.get("chat_template"),
    )
    recipe.validate()
    return recipe


def place_base(method: str, models: list[ModelSpec], base: str) -> list[ModelSpec]:
    """The models merged beside the base. mergekit lets the base appear in the model list.
    For a method that averages the base with the others (linear), the base is one more
    input: kept where it is listed, with its parameters, else appended (as mergekit
    does); for the others it is only the base, and its entry is dropped."""
    from zoo.merge.methods import METHODS

    m = METHODS.get(method)
    if m is not None and m.base_is_input:
        return models if any(x.model == base for x in models) else [*models, ModelSpec(base, {})]
    return [x for x in models if x.model != base]


def _dtype_name(value: Any) -> str | None:
    """A dtype as mergekit names it: an optional ``torch.`` prefix is dropped."""
    if value is None:
        return None
    text = str(value)
    return text[len("torch."):] if text.startswith("torch.") else text


def load(path: str | Path) -> Recipe:
    """Read a YAML (or JSON) recipe file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ZooError(f"cannot read recipe {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ZooError(f"recipe {path} is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML") from None
    try:
        data = yaml.load(text, Loader=RecipeLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise ZooError(f"{path}: not valid YAML ({' '.join(str(e).split())[:160]})") from None
    return from_dict(data)


class RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 (and mergekit, through pydantic)
    do: ``1e-3`` and ``3e38`` are floats, not the strings YAML 1.1 makes of them. A key
    given twice in one mapping is an error, not a silent last-one-wins."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, str) and key in seen:
                raise ZooError(f"the recipe gives {key!r} twice (line {key_node.start_mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep)


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"))


def parse_param(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is read as YAML (numbers, booleans)."""
    if "=" not in text:
        raise ZooError(f"--param {text!r}: expected KEY=VALUE")
    key, _, raw = text.partition("=")
    try:
        value = yaml.load(raw, Loader=RecipeLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def from_cli(method: str, base: str | None, models: list[str], params: list[str], *, dtype: str | None = None,
             out_dtype: str | None = None, seed: int = 0) -> Recipe:
    """A recipe from flags: ``--param`` values that are per-model parameters apply to every model."""
    get_method(method)
    specs = [ModelSpec(x, {}) for x in models]
    if base is not None:
        specs = place_base(method, specs, base)
    recipe = Recipe(merge_method=method, models=specs, base_model=base,
                    parameters={}, dtype=dtype, out_dtype=out_dtype, seed=seed)
    return with_overrides(recipe, params)


def with_overrides(recipe: Recipe, params: list[str], seed: int | None = None) -> Recipe:
    """A recipe file's recipe with ``KEY=VALUE`` flags on top: per-model parameters set
    for every model, the others globally; checked again."""
    m = get_method(recipe.merge_method)
    for text in params:
        key, value = parse_param(text)
        if key in m.model_parameters:
            for spec in recipe.models:
                spec.parameters[key] = value
        elif key in m.parameters:
            recipe.parameters[key] = value
        else:
            if key in LOOP_PARAMETERS and not m.learned:
                validate_params(m, {key: value}, [])  # says that the method does not train
            known = ", ".join(sorted({*m.parameters, *m.model_parameters})) or "none"
            raise ZooError(f"{recipe.merge_method}: unknown parameter {key!r} (parameters: {known})")
    if seed is not None:
        recipe.seed = seed
    recipe.validate()
    return recipe


def dumps(recipe: Recipe) -> str:
    return json.dumps(recipe.to_dict(), sort_keys=True)
