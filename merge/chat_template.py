"""``chat_template``: the chat template a merge's tokenizer carries, as mergekit 0.1.5 picks it.

``auto``: the most common template among the merged models' tokenizers (each stripped
of surrounding white space; a tie goes to the first met, the base first and then the
models as listed; none: the tokenizer keeps its own). Any other value is a Jinja
template, used as written. mergekit also accepts the names of templates it ships
(``chatml``, ``llama3``, ...); zoo does not ship them, and says so.
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any, Callable

from zoo.errors import ZooError

if TYPE_CHECKING:
    from zoo.merge.plan import Input


def check(value: Any) -> None:
    """Refuse, before any work, a value mergekit refuses or zoo cannot honour."""
    if value is None or value == "auto":
        return
    if not isinstance(value, str) or not value:
        raise ZooError("chat_template must be auto or a Jinja template")
    if len(value) < 256 and "\n" not in value and "{" not in value:
        raise ZooError(f"chat_template {value!r}: mergekit's built-in template names are not shipped with zoo; "
                       "give the template's Jinja text, or auto")
    if len(value) < 20 or "{" not in value:
        raise ZooError(f"chat_template {value!r} is not a valid template (mergekit: Invalid chat template)")


def resolve(value: str | None, inputs: "list[Input]", load: "Callable[[Input], Any]") -> str | None:
    """The template to set (None: leave the tokenizer's own). ``load`` gives an input's
    tokenizer (or None)."""
    if value is None:
        return None
    if value != "auto":
        return value
    found = []
    seen: set[str] = set()
    for inp in inputs:
        if inp.label in seen:
            continue
        seen.add(inp.label)
        tok = load(inp)
        template = getattr(tok, "chat_template", None) if tok is not None else None
        if isinstance(template, dict):
            template = template.get("default")
        if template:
            found.append(template.strip())
    return Counter(found).most_common(1)[0][0] if found else None
