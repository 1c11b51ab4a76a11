"""Merge recipes: mergekit's YAML format, and the same recipe built from CLI flags.

Accepted mergekit fields: ``merge_method``, ``base_model``, ``models[].model``,
``models[].parameters`` (``weight``, ``density``, ...), global ``parameters`` (which
also hold per-model parameters for every model that does not set them), ``dtype``
(the compute dtype, and the saved one unless ``out_dtype`` is given), ``out_dtype``,
``tokenizer_source`` or the ``tokenizer:`` block (merge/vocab.py), ``chat_template``
(merge/chat_template.py), and ``MODEL+ADAPTER`` model references (merge/lora_ref.py);
or, in place of ``models``, ``slices`` of ``sources`` with a ``layer_range`` each (a
slice's own ``base_model`` and ``parameters`` too), which stack, reorder or
interpolate layers (Goddard et al., "Arcee's MergeKit: A Toolkit for Merging Large
Language Models", EMNLP 2024 Industry, arXiv 2403.13257).

A parameter is a number; a *gradient*, a list of numbers interpolated over the layers
(``t: [0, 0.5, 1]``); or a list of ``{filter: SUBSTRING, value: V}`` conditionals where
the first whose filter is in the tensor name wins, and whose value may be a gradient (a
conditional without ``filter``, or with ``filter: "*"``, matches every tensor; when
none matches, the next scope answers: a source's parameters, then its slice's, then
the global ones). zoo adds ``seed`` (for DARE) and ``heads`` (patterns of
task-specific tensors).
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
UNSUPPORTED = ("modules",)


@dataclass
class ModelSpec:
    model: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceSpec:
    """One input of a slice: a model's layers ``[start, end)``, with its own parameters."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass
class SliceSpec:
    """Consecutive output layers, each merged from the same-offset layer of every source."""

    sources: list[SourceSpec]
    base_model: str | None = None  # None: the recipe's
    parameters: dict[str, Any] = field(default_factory=dict)

    @property
    def length(self) -> int:
        start, end = self.sources[0].layer_range
        return end - start


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
    # ``slices`` recipes: the layers each output slice takes; ``models`` then lists every
    # model the slices name (their parameters live in the slices).
    slices: list[SliceSpec] | None = None
    tokenizer: dict[str, Any] | None = None  # mergekit's tokenizer: block (merge/vocab.py)
    chat_template: str | None = None  # auto or a Jinja template (merge/chat_template.py)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["models"] = [{"model": m.model, "parameters": m.parameters} for m in self.models]
        for key in ("tokenizer", "chat_template"):
            if d[key] is None:
                del d[key]  # a recipe without them is recorded as before they existed
        if self.slices is None:
            del d["slices"]  # a models recipe's record stays as it was
        else:
            d["slices"] = [{"sources": [{"model": s.model, "layer_range": list(s.layer_range),
                                         "parameters": s.parameters} for s in sl.sources],
                            **({"base_model": sl.base_model} if sl.base_model else {}),
                            "parameters": sl.parameters} for sl in self.slices]
        return d

    def validate(self) -> None:
        """Refuse unknown methods and parameters and bad values before any work."""
        method = get_method(self.merge_method)
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ZooError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.out_dtype is not None and self.out_dtype not in DTYPES:
            raise ZooError(f"out_dtype {self.out_dtype!r} is not one of {', '.join(DTYPES)}")
        if method.needs_base and not self.base_model and self.slices is None:
            raise ZooError(f"{self.merge_method} needs a base model (base_model / --base)")
        if not self.models:
            raise ZooError("the recipe names no models to merge")
        if self.slices is None:
            check_count(method, len(self.models))
        if self.tokenizer_source is not None and (not isinstance(self.tokenizer_source, str)
                                                  or not self.tokenizer_source):
            raise ZooError("tokenizer_source must be base, union or the name of a merged model")
        check_tokenizer(self.tokenizer_source, self.tokenizer)
        check_chat_template(self.chat_template)
        _check_scope(method, self.parameters, "parameters", shared=True)
        for m in self.models:
            _check_scope(method, m.parameters, f"parameters of {m.model}", shared=False)
        for i, sl in enumerate(self.slices or []):
            if method.learned:
                raise ZooError(f"{self.merge_method} learns by running the model and does not take slices; "
                               "give models instead")
            base = sl.base_model or self.base_model
            if method.needs_base and not base:
                raise ZooError(f"{self.merge_method} needs a base model: give base_model in the recipe or in slice {i}")
            names = [s.model for s in sl.sources]
            if base and method.needs_base and base not in names:
                raise ZooError(f"slice {i}: the base model {base} is not among its sources; add it with the "
                               "same layer_range as the others")
            check_count(method, len(slice_models(method, names, base)))
            _check_scope(method, sl.parameters, f"parameters of slice {i}", shared=True)
            for src in sl.sources:
                _check_scope(method, src.parameters, f"parameters of {src.model} in slice {i}", shared=False)


def _check_scope(method: Any, params: dict[str, Any], where: str, *, shared: bool) -> None:
    """Refuse unknown parameters and every value a parameter can take that the method
    refuses (each conditional's, each point of a gradient). A shared scope (global or a
    slice's) may hold the method's own parameters and per-model ones for every model."""
    catch_all = split_globals(method, params)[1] if shared else params
    for key, value in params.items():
        for leaf in _leaves(value, where, key):
            if key in catch_all:
                validate_params(method, {}, [{key: leaf}])
            else:
                validate_params(method, {key: leaf}, [])


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


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (int, float, str, bool))


def _leaves(value: Any, where: str, key: str) -> list[Any]:
    """Every plain value a setting holds: itself, a gradient's points, or each
    conditional's (whose value may be a gradient)."""
    if not isinstance(value, list):
        return [value]
    if not value:
        raise ZooError(f"{where}: {key} is an empty list")
    if all(_is_scalar(v) for v in value):
        return list(value)  # a gradient
    out = []
    for cond in value:
        if not isinstance(cond, dict) or "value" not in cond or set(cond) - {"filter", "value"}:
            raise ZooError(f"{where}: {key} must be a number, a gradient (a list of numbers) or a list of "
                           "{filter: SUBSTRING, value: V} conditionals")
        if cond.get("filter") is not None and not isinstance(cond["filter"], str):
            raise ZooError(f"{where}: {key}: a conditional's filter must be a string, got {cond['filter']!r}")
        inner = cond["value"]
        if isinstance(inner, list) and not (inner and all(_is_scalar(v) for v in inner)):
            raise ZooError(f"{where}: {key}: a conditional's value must be a number or a gradient")
        out += _leaves(inner, where, key)
    return out


def evaluate(value: Any, tensor: str, t: float) -> Any:
    """A setting's value for one tensor at layer position ``t`` (0 to 1), as mergekit
    evaluates it; None when no conditional matches. A gradient of numbers is
    interpolated linearly between its two nearest points (``t * (n - 1)``, truncated);
    a gradient of booleans or strings takes the point at or below."""
    if not isinstance(value, list):
        return value
    if value and all(_is_scalar(v) for v in value):
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        if any(isinstance(v, (bool, str)) for v in value):
            return value[i0]
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    for cond in value:
        f = cond.get("filter")
        if f is None or f == "*" or f in tensor:  # "*" is mergekit's wildcard, not a substring
            return evaluate(cond["value"], tensor, t)
    return None


def resolve(params: dict[str, Any], tensor: str, t: float = 0.0) -> dict[str, Any]:
    """The value each parameter takes for one tensor at layer position ``t``; a
    conditional list where nothing matches leaves the parameter out (mergekit then asks
    the next scope)."""
    out = {}
    for key, value in params.items():
        got = evaluate(value, tensor, t)
        if got is not None:
            out[key] = got
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
            raise ZooError(f"recipe field {key!r} is not supported yet; use merge_method, base_model and models "
                           "or slices")
    known = {"merge_method", "base_model", "models", "slices", "parameters", "dtype", "out_dtype", "seed", "heads",
             "tokenizer_source", "tokenizer", "chat_template", "name"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ZooError(f"unknown recipe field(s): {', '.join(unknown)}")
    if "merge_method" not in data:
        raise ZooError("the recipe has no merge_method")
    if data.get("models") and data.get("slices"):
        raise ZooError("give either models or slices, not both (as in mergekit)")
    slices = _read_slices(data["slices"]) if data.get("slices") is not None else None
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
    if slices is not None:  # every model the slices name, once, in order (their parameters stay in the slices)
        models = [ModelSpec(m, {}) for m in dict.fromkeys(s.model for sl in slices for s in sl.sources)
                  if m != base or _base_is_input(str(data["merge_method"]))]
    elif base is not None:
        models = place_base(str(data["merge_method"]), models, base)
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ZooError("seed must be an integer")
    recipe = Recipe(
        merge_method=str(data["merge_method"]), models=models, base_model=base,
        parameters=dict(data.get("parameters") or {}), dtype=_dtype_name(data.get("dtype")),
        out_dtype=_dtype_name(data.get("out_dtype")), seed=seed,
        heads=list(data.get("heads") or DEFAULT_HEAD_PATTERNS), tokenizer_source=data.get("tokenizer_source"),
        slices=slices, tokenizer=data.get("tokenizer"), chat_template=data.get("chat_template"),
    )
    recipe.validate()
    return recipe


def _read_slices(raw: Any) -> list[SliceSpec]:
    """``slices``: a list of ``{sources: [{model, layer_range: [start, end], parameters}],
    base_model, parameters}``; every source of a slice spans the same number of layers."""
    if not isinstance(raw, list) or not raw:
        raise ZooError("slices must be a non-empty list of {sources: [{model, layer_range}]} entries")
    out = []
    for i, sl in enumerate(raw):
        if not isinstance(sl, dict) or not isinstance(sl.get("sources"), list) or not sl["sources"]:
            raise ZooError(f"slice {i} needs sources: a list of {{model: NAME, layer_range: [START, END]}}")
        unknown = sorted(set(sl) - {"sources", "base_model", "parameters", "residual_weight"})
        if unknown:
            raise ZooError(f"slice {i}: unknown field(s) {', '.join(map(str, unknown))}")
        if sl.get("residual_weight") is not None:
            raise ZooError(f"slice {i}: residual_weight is not supported (mergekit 0.1.5 does not use it either)")
        sources = []
        for src in sl["sources"]:
            if not isinstance(src, dict) or "model" not in src:
                raise ZooError(f"slice {i}: each source needs a model and a layer_range, got {src!r}")
            unknown = sorted(set(src) - {"model", "layer_range", "parameters"})
            if unknown:
                raise ZooError(f"slice {i}: unknown source field(s) {', '.join(map(str, unknown))}")
            rng = src.get("layer_range")
            if not (isinstance(rng, list) and len(rng) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                     for x in rng) and 0 <= rng[0] < rng[1]):
                raise ZooError(f"slice {i}: {src['model']}'s layer_range must be [START, END] with "
                               f"0 <= START < END, got {rng!r}")
            params = src.get("parameters") or {}
            if not isinstance(params, dict):
                raise ZooError(f"slice {i}: parameters of {src['model']} must be a mapping")
            sources.append(SourceSpec(_model_ref(src["model"]), (rng[0], rng[1]), dict(params)))
        lengths = {s.layer_range[1] - s.layer_range[0] for s in sources}
        if len(lengths) > 1:
            raise ZooError(f"slice {i}: all its sources must span the same number of layers, got "
                           + ", ".join(f"{s.model} {list(s.layer_range)}" for s in sources))
        params = sl.get("parameters") or {}
        if not isinstance(params, dict):
            raise ZooError(f"slice {i}: parameters must be a mapping")
        base = _model_ref(sl["base_model"]) if sl.get("base_model") is not None else None
        out.append(SliceSpec(sources, base, dict(params)))
    return out


def _base_is_input(method: str) -> bool:
    from zoo.merge.methods import METHODS

    return method in METHODS and METHODS[method].base_is_input


def slice_models(method: Any, names: list[str], base: str | None) -> list[str]:
    """A slice's models merged beside its base: its sources, less the base unless the
    method averages the base too. Unlike ``models``, a slice gets no base it does not list."""
    return names if method.base_is_input or base is None else [n for n in names if n != base]


def place_base(method: str, models: list[ModelSpec], base: str) -> list[ModelSpec]:
    """The models merged beside the base. mergekit lets the base appear in the model list.
    For a method that averages the base with the others (linear), the base is one more
    input: kept where it is listed, with its parameters, else appended (as mergekit
    does); for the others it is only the base, and its entry is dropped."""
    if _base_is_input(method):
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
    return from_dict(read_yaml(path, "recipe"))


def read_yaml(path: str | Path, what: str = "", error: type[ZooError] = ZooError) -> Any:
    """A YAML file's data, read as recipes are (``RecipeLoader``); ``error`` with one line
    for a file that cannot be read, is not UTF-8 or is not YAML (``what`` names the file)."""
    label = f"{what} {path}" if what else str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise error(f"cannot read {label}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise error(f"{label} is not UTF-8 text (byte {e.start}); save it as UTF-8 YAML") from None
    try:
        return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML ({' '.join(str(e).split())[:160]})") from None


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
