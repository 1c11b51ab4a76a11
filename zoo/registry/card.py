"""The model card a registered model is published with: Hub front matter, then its
recipe, lineage and metrics, all from the registry.

The front matter follows the Hub's conventions for merges: ``base_model`` lists the
parents, ``base_model_relation`` says how the model came from them, ``library_name``
is explicit (the Hub no longer infers it), and ``tags`` carry ``zoo``, ``merge`` for
merges and ``mergelock`` for protected weights. A protected model's parents are
those of the model it protects: MergeLock changes the weights, not the lineage.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import yaml

if TYPE_CHECKING:  # merge/ imports this module; the registry (SQLAlchemy) loads only when used
    from zoo.registry import Registry

# Learned merges keep these (large, per-tensor) in the registry's lineage only.
PRIVATE_LEARNED = ("coefficients", "coefficient_tensors", "table", "offset_tensors")
RELATION = {"merged": "merge", "expert": "finetune", "adapter": "adapter"}
LIBRARY = "transformers"  # explicit: the Hub no longer infers it
TAG = "zoo"
MERGE_TAG = "merge"
MERGELOCK_TAG = "mergelock"


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


def read_front_matter(text: str) -> Any:
    """The YAML between a card's leading ``---`` lines (None when there is none); a
    ValueError when it is not closed. Parsed with ``yaml.safe_load``: cards are hostile."""
    if not text.startswith("---"):
        return None
    end = text.find("\n---", 3)
    if end < 0:
        raise ValueError("the front matter has no closing '---'")
    return yaml.safe_load(text[3:end])


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
