"""The merged vocabulary: ``tokenizer_source`` and the ``tokenizer:`` block.

Builds the output tokenizer as mergekit 0.1.5 does (the base's, a named model's, or
the union of every model's), and, for each input, the permutation from the new token
ids to that model's own (-1 where it lacks the token). Each vocabulary tensor (the
token embeddings, the output head) is then rebuilt per input before merging
(``Vocabulary.align``): a model's own row where it has the token, else a default row
chosen once for all models: the ``tokens:`` entry, else the only model that has it,
else the base's row, else the mean over the models that have it, else zeros. Rows
past the vocabulary (``pad_to_multiple_of``) get the mean of the model's real rows
(Hewitt 2021, "Initializing new word embeddings for pretrained language models").

Where mergekit takes its inputs in ``set`` order (whose tokens come first in a union,
whose tokenizer a recipe without a base uses), zoo takes the recipe's: the base, then
the models as listed. Tokens of one tokenizer are taken in id order.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.checkpoints.writer import write_file
from zoo.errors import ZooError

if TYPE_CHECKING:
    import torch

    from zoo.merge.plan import Input

# Tensors indexed by token (vocabulary axis 0), by the end of their name.
VOCAB_TENSORS = ("embed_tokens.weight", "lm_head.weight", "wte.weight", "word_embeddings.weight",
                 "embed_in.weight", "embed_out.weight")
# The files that make a tokenizer (removed from a merge before a rebuilt one is saved).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "vocab.txt", "chat_template.jinja")


@dataclass(frozen=True)
class TokenSource:
    """Where a token's default row comes from: a model's row for the token (``model``),
    a model's row by its own id or token (``model_token``), or zeros (``zero``)."""

    kind: str  # model | model_token | zero
    model: str | None = None  # the input's label
    token_id: int | None = None
    token: str | None = None
    force: bool = False  # every model takes the default row, even one that has the token


@dataclass
class Vocabulary:
    """The merged tokenizer and how every input's rows move into it."""

    tokenizer: Any  # a transformers tokenizer, saved with the merge
    vocab: dict[str, int]  # token -> new id
    size: int  # rows of the new vocabulary tensors (padded)
    owners: list[str]  # the inputs' labels, in mergekit's order: the models as listed, then the base
    base: str | None  # the base's label
    perms: dict[str, list[int]]  # label -> old id for every new id (-1: absent)
    originals: dict[str, dict[str, int]]  # label -> its own vocabulary
    tokens: dict[str, TokenSource] = field(default_factory=dict)  # the recipe's tokens: entries
    tensors: set[str] = field(default_factory=set)  # the tensor names rebuilt
    inputs: "dict[str, Input]" = field(default_factory=dict)  # label -> input, to check tensor shapes

    def shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """A merged tensor's shape; a vocabulary tensor's is recorded to be rebuilt."""
        if not is_vocab_tensor(name, shape):
            return shape
        for label, inp in self.inputs.items():
            info = None if inp.is_adapter else inp.ckpt.tensors.get(name)
            if info is None:
                continue
            if tuple(info.shape[1:]) != tuple(shape[1:]):
                raise ZooError(f"{name}: {label}'s rows are {list(info.shape[1:])} wide, the base's "
                               f"{list(shape[1:])}; rows of different widths do not merge")
            used = max(self.perms[label], default=-1)
            if used >= info.shape[0]:
                raise ZooError(f"{name}: {label}'s tokenizer has token id {used} but the tensor has only "
                               f"{info.shape[0]} rows")
        self.tensors.add(name)
        return (self.size, *shape[1:])

    def check_tokens(self, rows: dict[str, int]) -> None:
        """Refuse, before any work, a ``tokens:`` entry whose row cannot be found where it is needed."""
        for tok, cfg in self.tokens.items():
            i = self.vocab[tok]
            if not cfg.force and all(self.perms[o][i] >= 0 for o in self.owners):
                continue  # every model has it: the entry is never used
            if cfg.kind == "none":
                raise ZooError(f"tokenizer: token {tok!r} needs a row and its entry gives no source")
            if cfg.kind == "model" and self.perms[cfg.model][i] < 0:
                raise ZooError(f"tokenizer: token {tok!r} is not in {cfg.model}, which should give its row")
            if cfg.kind == "model_token":
                src = cfg.token_id if cfg.token_id is not None else self.originals[cfg.model].get(cfg.token)
                if src is None or not 0 <= src < rows[cfg.model]:
                    raise ZooError(f"tokenizer: token {tok!r}: {cfg.model} has no token "
                                   f"{cfg.token if cfg.token_id is None else cfg.token_id!r}")

    def moves_rows(self) -> bool:
        """Whether any model's rows move (or new ones appear): not every model has exactly these tokens at these ids."""
        same = list(range(len(self.vocab)))
        return self.size != len(self.vocab) or any(p != same or len(self.originals[o]) != len(same)
                                                   for o, p in self.perms.items())

    def tolerates(self, kind: str, tensor: str | None) -> bool:
        """A compatibility finding the rebuilt vocabulary resolves: vocab_size, or a vocabulary tensor's rows."""
        return kind == "vocab" or (kind == "shape" and tensor is not None and tensor.endswith(VOCAB_TENSORS))

    def align(self, base: "torch.Tensor | None", base_label: str | None, xs: list["torch.Tensor"],
              labels: list[str]) -> "tuple[torch.Tensor | None, list[torch.Tensor]]":
        """Each input's tensor rebuilt on the new vocabulary (axis 0), in the inputs' promoted
        dtype. ``xs`` is updated in place, one input at a time, so each old tensor can be
        freed as soon as its new one exists."""
        import torch

        given = dict(zip(labels, xs))
        if base is not None and base_label is not None:
            given.setdefault(base_label, base)
        order = [o for o in self.owners if o in given]
        dtype = given[order[0]].dtype
        for o in order:
            dtype = torch.promote_types(dtype, given[o].dtype)
        rest = tuple(given[order[0]].shape[1:])
        defaults = self._defaults(given, order, dtype, rest)
        n = len(self.vocab)
        dev = given[order[0]].device
        ids = torch.tensor(list(self.vocab.values()), dtype=torch.long, device=dev)
        names = list(self.vocab)
        forced = torch.tensor([self.tokens[t].force if t in self.tokens else False for t in names], device=dev)
        for o in order:
            p = torch.tensor([self.perms[o][i] for i in ids.tolist()], dtype=torch.long, device=dev)
            own = (p >= 0) & ~forced
            new = torch.zeros((self.size, *rest), dtype=dtype, device=dev)
            new[ids[own]] = given[o][p[own]].to(dtype)
            for k in (~own).nonzero().flatten().tolist():
                row = defaults.get(names[k])
                if row is not None:
                    new[ids[k]] = row
            if self.size > n:  # padding rows: the mean of the real ones
                new[n:] = torch.mean(new[:n], dim=0)
            for k, lb in enumerate(labels):
                if lb == o:
                    xs[k] = new
            given[o] = new
            if o == base_label:
                base = new
        return (base if base_label is not None else None), xs

    def _defaults(self, given: dict[str, "torch.Tensor"], order: list[str], dtype: "torch.dtype",
                  rest: tuple[int, ...]) -> dict[str, "torch.Tensor"]:
        """The default row of every token some model lacks (or that is forced)."""
        import torch

        configs = dict(self.tokens)
        average = set()
        for tok, i in self.vocab.items():
            if tok in configs:
                continue
            has = [o for o in order if self.perms[o][i] >= 0]
            if len(has) == 1:
                configs[tok] = TokenSource("model", has[0])
            elif not has:
                configs[tok] = TokenSource("zero")
            elif self.base in order and self.perms[self.base][i] >= 0:
                configs[tok] = TokenSource("model", self.base)
            else:
                average.add(tok)
        out = {}
        for tok, i in self.vocab.items():
            cfg = configs.get(tok)
            if not (cfg is not None and cfg.force) and all(self.perms[o][i] >= 0 for o in order):
                continue
            if tok in average:
                row = torch.zeros(rest, dtype=dtype, device=given[order[0]].device)
                count = 0
                for o in order:  # summed in order, then divided, as mergekit does
                    if self.perms[o][i] >= 0:
                        row = row + given[o][self.perms[o][i]]
                        count += 1
                row /= count
            elif cfg is None:
                continue
            elif cfg.kind == "none":
                raise ZooError(f"tokenizer: token {tok!r} needs a row and its entry gives no source")
            elif cfg.kind == "zero":
                row = given[order[0]].new_zeros(rest)
            else:
                if cfg.model not in given:
                    raise ZooError(f"tokenizer: token {tok!r} takes its row from {cfg.model}, which is not merged")
                if cfg.kind == "model_token":
                    src = cfg.token_id if cfg.token_id is not None else self.originals[cfg.model].get(cfg.token)
                    if src is None or not 0 <= src < given[cfg.model].shape[0]:
                        raise ZooError(f"tokenizer: token {tok!r}: {cfg.model} has no token "
                                       f"{cfg.token if cfg.token_id is None else cfg.token_id!r}")
                else:
                    src = self.perms[cfg.model][i]
                    if src < 0:
                        raise ZooError(f"tokenizer: token {tok!r} is not in {cfg.model}, which should give its row")
                row = given[cfg.model][src].clone()  # a copy: the model's old tensor can then be freed
            out[tok] = row
        return out


def is_vocab_tensor(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and name.endswith(VOCAB_TENSORS)


def find_input(everyone: "list[Input]", name: str) -> "Input | None":
    """The merged input a recipe names: by what the user wrote or its registry ref."""
    for m in everyone:
        if m.label == name or m.ref == name or (m.ref and m.ref.split("@")[0] == name):
            return m
    return None


def load_tokenizer(inp: "Input") -> Any:
    """An input's tokenizer, as transformers loads it from its files (None without one)."""
    files = {n: p for n, p in inp.ckpt.files.items() if n in TOKENIZER_FILES}
    if not files or not ({"tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt"} & set(files)):
        return None
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        for name, path in files.items():
            (Path(tmp) / name).write_bytes(path.read_bytes())
        try:
            return transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise ZooError(f"cannot load the tokenizer of {inp.label}: {' '.join(str(e).split())[:200]}") from None


def _rows(inp: "Input", tok: Any) -> int:
    """How many token ids the model has rows for: its config's vocab_size, else its tokenizer's."""
    cfg = inp.ckpt.config if inp.ckpt.form == "model" else None
    size = (cfg or {}).get("vocab_size")
    return int(size) if isinstance(size, int) else len(tok.get_vocab())


def _reloaded(tok: Any) -> Any:
    """A fresh copy of a tokenizer (saved and loaded again), so adding tokens leaves the original alone."""
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        tok.save_pretrained(tmp, legacy_format=False)
        return transformers.AutoTokenizer.from_pretrained(tmp, use_fast=True)


def _union(base_tok: Any, tokenizers: "list[tuple[Input, Any]]") -> Any:
    """The base's tokenizer plus every other model's tokens: plain vocabulary tokens
    first (in model order, then id order), then the added tokens (the first model's
    settings win)."""
    plain: dict[str, None] = {}
    added: dict[str, Any] = {}
    for inp, tok in tokenizers:
        rows = _rows(inp, tok)
        for t, i in sorted(tok.get_vocab().items(), key=lambda x: x[1]):
            if i < rows:
                plain.setdefault(t, None)
        for i, info in tok.added_tokens_decoder.items():
            if i < rows:
                added.setdefault(info.content, info)
    out = _reloaded(base_tok)
    base_vocab = base_tok.get_vocab()
    for t in plain:
        if t not in added and t not in base_vocab:
            out.add_tokens(t)
    for info in added.values():
        out.add_tokens(info)
    return out


def build(recipe_source: Any, block: dict[str, Any] | None, base: "Input | None",
          models: "list[Input]") -> Vocabulary:
    """The merged vocabulary for ``tokenizer_source`` (or the ``tokenizer:`` block)."""
    source = block.get("source", "union") if block is not None else recipe_source
    token_cfg: dict[str, Any] = dict((block or {}).get("tokens") or {})
    everyone = [m for m in [*([base] if base is not None else []), *models]]
    distinct: list[Input] = []
    for m in everyone:
        if all(m.label != d.label for d in distinct):
            distinct.append(m)
    first = distinct[0]
    loaded: list[tuple[Input, Any]] = []
    for m in distinct:
        tok = load_tokenizer(base if m.is_adapter and base is not None else m)
        if tok is None:
            if m is first:
                raise ZooError(f"tokenizer_source {source}: {m.label} has no tokenizer to start from")
            continue  # as mergekit: a model without a tokenizer is taken to have the base's
        loaded.append((m, tok))
    base_tok = loaded[0][1]
    if any(i >= _rows(first, base_tok) for i in base_tok.get_vocab().values()):
        raise ZooError(f"tokenizer_source {source}: {first.label}'s tokenizer has tokens past its vocab_size; "
                       "zoo does not strip them")
    if source == "base":
        out = base_tok
        new = [t for t in token_cfg if t not in out.get_vocab()]
        if new:  # mergekit 0.1.5 adds it to the base's own tokenizer and then fails (KeyError)
            raise ZooError(f"tokenizer: new token {new[0]!r} on source base: mergekit 0.1.5 fails on this; "
                           "use source union (or a model) to add tokens")
    elif source == "union":
        out = _union(base_tok, loaded)
    else:
        named = find_input(everyone, str(source))
        if named is None:
            raise ZooError(f"tokenizer_source {source!r} is not one of the merged models; name one of them, "
                           "or use base or union")
        out = load_tokenizer(named)
        if out is None:
            raise ZooError(f"tokenizer_source {source}: {named.label} has no tokenizer to take")
    existing = set(out.get_vocab())
    for t in token_cfg:
        if t not in existing:
            out.add_tokens(t)
            existing.add(t)
    vocab = out.get_vocab()
    size = len(vocab)
    pad = (block or {}).get("pad_to_multiple_of")
    if pad and size % pad:
        size = (size // pad + 1) * pad
    own = {m.label: tok for m, tok in loaded}
    perms, originals = {}, {}
    for m in distinct:
        tok = own.get(m.label, base_tok)
        mv = tok.get_vocab()
        rows = _rows(m, tok) if m.label in own else _rows(first, base_tok)
        if any(mv[t] >= rows for t in vocab if t in mv):
            bad = next(t for t in vocab if t in mv and mv[t] >= rows)
            raise ZooError(f"tokenizer_source {source}: {m.label} has token {bad!r} at id {mv[bad]}, past its "
                           f"{rows} embedding rows (mergekit 0.1.5 fails on this)")
        perm = [-1] * len(vocab)
        for t, i in vocab.items():
            perm[i] = mv.get(t, -1)
        perms[m.label] = perm
        originals[m.label] = mv
    listed = [m.label for m in models]
    owners = [*dict.fromkeys(listed)]
    if base is not None and base.label not in owners:
        owners.append(base.label)
    tokens = {t: _token_source(t, spec, everyone) for t, spec in token_cfg.items()}
    result = Vocabulary(out, vocab, size, owners, base.label if base is not None else None, perms, originals, tokens)
    result.check_tokens(rows={m.label: _rows(m, own.get(m.label, base_tok)) for m in distinct})
    result.inputs = {m.label: m for m in distinct}
    return result


def _token_source(tok: str, spec: Any, everyone: "list[Input]") -> TokenSource:
    def model(name: Any) -> str:
        m = find_input(everyone, str(name))
        if m is None:
            raise ZooError(f"tokenizer: token {tok!r} names {name!r}, which is not one of the merged models")
        return m.label

    force = bool(spec.get("force", False))
    src = spec.get("source")
    if src is None:
        return TokenSource("none", force=force)
    if isinstance(src, str):
        return TokenSource("model", model(src), force=force)
    if src.get("kind") == "zero":
        return TokenSource("zero", force=force)
    return TokenSource("model_token", model(src["model"]), src.get("token_id"), src.get("token"), force)


def save(vocab: Vocabulary, folder: Path, chat_template: str | None) -> dict[str, str]:
    """Write the merged tokenizer into ``folder`` as transformers saves it (replacing any
    copied tokenizer files); set config.json's vocab_size. Returns the new files' sha256."""
    return save_tokenizer(vocab.tokenizer, folder, chat_template, vocab_size=vocab.size)


def save_tokenizer(tok: Any, folder: Path, chat_template: str | None, vocab_size: int | None = None) -> dict[str, str]:
    """``tok`` saved into ``folder`` (with ``chat_template`` when given), replacing the
    tokenizer files there; config.json's vocab_size set when given."""
    import hashlib

    for name in TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    if chat_template is not None:
        tok.chat_template = chat_template
    before = {p.name for p in folder.iterdir()}
    tok.save_pretrained(str(folder))
    out = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()
           if p.name not in before or p.name in TOKENIZER_FILES}
    path = folder / "config.json"
    if vocab_size is not None and path.exists():
        config = json.loads(path.read_text(encoding="utf-8"))
        if config.get("vocab_size") != vocab_size:
            config["vocab_size"] = vocab_size
            out["config.json"] = write_file(path, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return out
