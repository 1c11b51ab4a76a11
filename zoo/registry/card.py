"""The model card a registered model is published with: Hub front matter, then its
recipe, lineage and metrics, all from the registry.

The front matter follows the Hub's conventions for merges: ``base_model`` lists the
parents, ``base_model_relation`` says how the model came from them, ``library_name``
is explicit (the Hub no longer infers it), and ``tags`` carry ``zoo``, ``merge`` for
merges and ``mergelock`` for protected weights. A protected model's parents are
those of the model it protects: MergeLock changes the weights, not the lineage.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import yaml
import yaml.cyaml

from zoo.errors import ZooError

if TYPE_CHECKING:  # merge/ imports this module; the registry (SQLAlchemy) loads only when used
    from zoo.registry import Registry

# Learned merges keep these (large, per-tensor) in the registry's lineage only.
PRIVATE_LEARNED = ("coefficients", "coefficient_tensors", "table", "offset_tensors")
RELATION = {"merged": "merge", "expert": "finetune", "adapter": "adapter"}
LIBRARY = "transformers"  # explicit: the Hub no longer infers it
TAG = "zoo"
MERGE_TAG = "merge"
MERGELOCK_TAG = "mergelock"
MAX_DEPTH = 20  # nested collections in front matter; real cards use four or five
FRONT_MATTER_LIMIT = 256 * 1024  # bytes of front matter read; real cards hold a few KiB


class CardError(ZooError, ValueError):
    """Card front matter that is not plain data (see :func:`read_front_matter`)."""


def front_matter(parents: Sequence[str] = (), relation: str | None = None,
                 tags: Sequence[str] = ()) -> dict[str, Any]:
    """A card's Hub metadata: ``base_model`` (the parents) with ``base_model_relation``,
    ``library_name`` and ``tags`` (in the order given)."""
    front: dict[str, Any] = {}
    if parents:
        front["base_model"] = list(parents)
        if relation is not None:
            front["base_model_relation"] = relation
    front["library_name"] = LIBRARY
    front["tags"] = list(tags)
    return front


def render(front: dict[str, Any], title: str, body: Sequence[str]) -> str:
    """A whole card: the front matter between ``---`` lines, a title, then ``body``'s lines."""
    return "\n".join(["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "", f"# {title}", "",
                      *body])


def read_front_matter(text: str | bytes) -> dict[str, Any] | None:
    """The YAML mapping between a card's leading ``---`` lines (None when there is none).

    Cards are hostile, so this is a strict, data-only reader; a :class:`CardError` (a
    ``ValueError``) names what it refuses: aliases and anchors (a few bytes of nested
    aliases expand to gigabytes), any explicit tag, more than ``MAX_DEPTH`` nested
    collections, more than ``FRONT_MATTER_LIMIT`` bytes, duplicate keys, NaN and
    infinities, text that is not UTF-8, and front matter that is not a mapping. Values
    take JSON's types, as the Hub serves ``cardData``: a date or timestamp stays a
    string. Keys are strings: a key such as ``1`` or ``true`` is kept as written. A
    leading byte-order mark is dropped.
    """
    if isinstance(text, (bytes, bytearray)):
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError as e:
            raise CardError(f"the card is not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start})") \
                from None
    text = text.removeprefix("\ufeff")
    opening = _OPENING.match(text)
    if opening is None:
        return None
    closing = _CLOSING.search(text, opening.end())
    if closing is None:
        raise CardError("the front matter has no closing '---'")
    body = text[opening.end():closing.start()]
    size = len(body.encode("utf-8", "surrogatepass"))
    if size > FRONT_MATTER_LIMIT:
        raise CardError(f"the front matter is {size} bytes, over the {FRONT_MATTER_LIMIT >> 10} KiB a card may hold")
    data = _load(body)
    if data is not None and not isinstance(data, dict):
        raise CardError(f"the front matter must be a mapping, not {_kind(data)}")
    return data


class _Frame:
    """A collection being built: a list, or a mapping and the key that waits for its value."""

    __slots__ = ("value", "key")

    def __init__(self, value: list | dict):
        self.value, self.key = value, None


def _load(body: str) -> Any:
    """Build plain values from the parser's events, refusing what is not plain data.

    Works on events rather than PyYAML's node tree so that nothing recursive runs on
    the card's nesting, and the first refused event stops the parse.
    """
    stack: list[_Frame] = []
    root: Any = None
    documents = 0
    try:
        parser = yaml.cyaml.CParser(body) if yaml.__with_libyaml__ else yaml.SafeLoader(body)
        while True:
            event = parser.get_event()
            if isinstance(event, yaml.StreamEndEvent):
                return root
            if isinstance(event, yaml.DocumentStartEvent):
                documents += 1
                if documents > 1:
                    raise CardError(f"the front matter holds more than one YAML document{_at(event)}")
                continue
            if not isinstance(event, (yaml.NodeEvent, yaml.CollectionEndEvent)):
                continue  # stream start, document end
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
                raise CardError(f"YAML anchors and aliases are refused in card metadata{_at(event)}")
            if getattr(event, "tag", None) is not None:
                raise CardError(f"YAML tags are refused in card metadata ({event.tag}){_at(event)}")
            top = stack[-1] if stack else None
            if isinstance(event, yaml.CollectionEndEvent):
                value = stack.pop().value
            elif top is not None and isinstance(top.value, dict) and top.key is None:
                if not isinstance(event, yaml.ScalarEvent):
                    raise CardError(f"a key must be a string, not a sequence or mapping{_at(event)}")
                if event.value in top.value:
                    raise CardError(f"duplicate key {event.value[:80]!r}{_at(event)}")
                top.key = event.value
                continue
            elif isinstance(event, yaml.ScalarEvent):
                value = _scalar(event)
            else:  # a sequence or a mapping starts
                if len(stack) >= MAX_DEPTH:
                    raise CardError(f"card metadata nests deeper than {MAX_DEPTH} levels{_at(event)}")
                stack.append(_Frame([] if isinstance(event, yaml.SequenceStartEvent) else {}))
                continue
            if not stack:
                root = value
            elif isinstance(stack[-1].value, list):
                stack[-1].value.append(value)
            else:
                stack[-1].value[stack[-1].key] = value
                stack[-1].key = None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        where = f" (line {mark.line + 2} of the card)" if mark is not None else ""
        raise CardError(f"the front matter is not valid YAML: {problem}{where}") from None
    except UnicodeError:  # a str with lone surrogates: it was never UTF-8
        raise CardError("the card is not UTF-8 text (it holds a lone surrogate)") from None


# Plain scalars PyYAML's safe_dump writes unquoted as numbers, booleans and null, and no
# others: a card zoo writes reads back as written. Dates and timestamps stay strings.
_NULL = re.compile(r"~|null|Null|NULL|")
_BOOL = {"true": True, "True": True, "TRUE": True, "false": False, "False": False, "FALSE": False}
_INT = re.compile(r"[-+]?(?:0|[1-9][0-9]*)")
_FLOAT = re.compile(r"[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+][0-9]+)?")
_NOT_FINITE = re.compile(r"[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")
_OPENING = re.compile(r"---[ \t]*\r?\n")
_CLOSING = re.compile(r"^---[ \t]*\r?$", re.MULTILINE)


def _scalar(event: yaml.ScalarEvent) -> Any:
    text = event.value
    if event.style or not event.implicit[0]:  # quoted or block (libyaml says "" for plain): a string
        return text
    if _NULL.fullmatch(text):
        return None
    if text in _BOOL:
        return _BOOL[text]
    if _INT.fullmatch(text):
        try:
            return int(text)
        except ValueError:  # past Python's 4300 digits
            raise CardError(f"an integer of {len(text)} digits in card metadata{_at(event)}") from None
    if _FLOAT.fullmatch(text):
        value = float(text)
        if math.isfinite(value):
            return value
    if _NOT_FINITE.fullmatch(text) or _FLOAT.fullmatch(text):
        raise CardError(f"{text[:40]} is not a JSON number: card metadata has no NaN or infinity{_at(event)}")
    return text


def _at(event: yaml.Event) -> str:
    mark = event.start_mark
    return f" (line {mark.line + 2} of the card)" if mark is not None else ""


def _kind(value: Any) -> str:
    return {list: "a list", str: "a string", int: "a number", float: "a number", bool: "a boolean"}.get(
        type(value), type(value).__name__)


def public_recipe(recipe: dict[str, Any]) -> dict[str, Any]:
    """A recipe as a card shows it: without a learned merge's per-tensor values."""
    shown = dict(recipe)
    if isinstance(shown.get("learned"), dict):
        shown["learned"] = {k: v for k, v in shown["learned"].items() if k not in PRIVATE_LEARNED}
    return shown


def _hub_name(registry: "Registry", ref: str) -> str:
    """A parent as the Hub knows it: its repo id when it came from a Hub, else its registry ref."""
    if registry.has(ref):
        src = registry.show(ref)["source"]
        if src.get("hub_repo"):
            return src["hub_repo"]
    return ref


def hub_card(registry: "Registry", ref: str, title: str | None = None) -> str:
    """The README.md to publish ``ref`` with."""
    model = registry.show(ref)
    protected = model["kind"] == "protected"
    origin = model
    source = next((p["ref"] for p in model["parents"] if p["role"] == "source"), None)
    if protected and source and registry.has(source):
        origin = registry.show(source)
    parents = [p["ref"] for p in origin["parents"]] or ([origin["base"]] if origin.get("base") else [])
    front = front_matter([_hub_name(registry, p) for p in parents], RELATION.get(origin["kind"], "finetune"),
                         [TAG] + ([MERGE_TAG] if origin["kind"] == "merged" else [])
                         + ([MERGELOCK_TAG] if protected else []))
    lines = []
    what = {"merged": "a merge", "expert": "a fine-tuned expert", "base": "a base model",
            "adapter": "a LoRA adapter"}.get(origin["kind"], "a model")
    lines += [f"Published with zoo: {what}" + (f" of `{origin['base']}`" if origin.get("base") else "") + ".", ""]
    if protected:
        key_id = model.get("key_id") or (model.get("recipe") or {}).get("key_id")
        lines += ["## These weights are protected", "",
                  "The weights carry MergeLock: every attention layer's query-key and value-output branches "
                  "hold per-head invertible transforms. The model computes the same outputs as the model it was "
                  "made from, so it can be used as it is, but merging these weights with other fine-tuned models "
                  "(task arithmetic, TIES and the like) gives a broken model. The owner keeps the key"
                  + (f" (key id `{key_id}`)" if key_id else "") + "; it is not in this repository.", "",
                  "MergeLock guards the weights against naive merging only: the outputs are unchanged, so "
                  "distillation from this model works, and a least-squares realignment against the public base "
                  "model can undo much of the transform.", ""]
    if origin.get("recipe"):
        lines += ["## Recipe", "", "```yaml", yaml.safe_dump(public_recipe(origin["recipe"]), sort_keys=True).rstrip(),
                  "```", ""]
    lines += ["## Lineage", ""] + _lineage(registry.lineage(ref)) + [""]
    metrics = [(model["ref"], m) for m in model["metrics"]]
    if origin is not model:
        metrics += [(origin["ref"], m) for m in origin["metrics"]]
    if metrics:
        lines += ["## Metrics", "", "| model | task | metric | split | value |", "|---|---|---|---|---|"]
        lines += [f"| `{r}` | {m['task'] or '-'} | {m['metric']} | {m['split'] or '-'} | {_value(m)} |"
                  for r, m in metrics]
        lines.append("")
    return render(front, title or model["name"], lines)


def _value(m: dict[str, Any]) -> str:
    v = m["value"]
    return f"{100 * v:.1f}%" if m["metric"] in ("accuracy", "disagreement") and 0 <= v <= 1 else f"{v:g}"


def _lineage(node: dict[str, Any], depth: int = 0) -> list[str]:
    role = f" ({node['role']})" if node.get("role") else ""
    method = f", made with `{node['method']}`" if node.get("method") else ""
    out = [f"{'  ' * depth}- `{node['ref']}`: {node['kind']}{role}{method}"]
    for p in node.get("parents", []):
        if depth < 1 or p["kind"] != "base":  # every expert's base is the same: shown once, at the top
            out += _lineage(p, depth + 1)
    return out
