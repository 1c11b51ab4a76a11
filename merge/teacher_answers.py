"""Generative experts' answers to their task's pool, kept as lineage artifacts of the
expert, so a later parity run with the same prompts and decode settings reads them
back instead of decoding again (decoding is most of what annotating a pool costs).

An artifact is one safetensors file per expert and decode key
(``merge.learned.generative_parity.decodes_key``, mixed with the base and the teacher
it was decoded by): the greedy answers' tokens (``greedy.tokens``, ``greedy.lengths``),
``ended`` and ``confidence`` per prompt, the sampled view's tokens when there is one
(``view.tokens``, ``view.lengths``), and the sampling generator's state after them
(``state``). Only registered teachers over a registered base keep theirs; the others
decode every run. A kept set is checked tensor by tensor before it is used; one that
does not fit the run (another shape, a token outside the vocabulary, no sampled view
where the run needs one) is logged and decoded anew, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from zoo.checkpoints.reader import open_safetensors
from zoo.errors import NotFound, ZooError

from zoo.merge.learned.distributed import current
from zoo.merge.learned.generative_parity import Decodes

if TYPE_CHECKING:
    from zoo.registry import Registry

FORMAT = "zoo-teacher-answers"
PREFIX = "teacher-answers-"


def artifact_key(key: str, teacher: str, base: str) -> str:
    """The artifact's key: the decode key, the teacher's ref and the base it adds its
    task vector to (an expert teaches as base + its task vector)."""
    blob = json.dumps({"decodes": key, "teacher": teacher, "base": base}, sort_keys=True)
    return PREFIX + hashlib.sha256(blob.encode()).hexdigest()[:16]


def _pack(answers: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
    flat = [x for a in answers for x in a]
    return {"tokens": torch.tensor(flat, dtype=torch.int64), "lengths": torch.tensor([len(a) for a in answers],
                                                                                     dtype=torch.int64)}


class Unusable(Exception):
    """A kept set of answers that does not fit this run (why, in one line)."""


@dataclass(frozen=True)
class Expect:
    """What this run's kept answers must be: ``sizes[t]`` answers for task t, each at
    most ``max_new_tokens`` tokens, token ids below ``vocabulary`` (when known), and a
    sampled view with the sampler's state when ``sampled``."""

    sizes: list[int]
    max_new_tokens: int
    sampled: bool
    vocabulary: int | None


def _tensor(f, name: str, dtype: torch.dtype, dims: int) -> torch.Tensor:
    if name not in f.tensors:
        raise Unusable(f"it has no {name!r}")
    x = f.read_tensor(name)
    if x.dtype != dtype or x.dim() != dims:
        raise Unusable(f"{name!r} is {x.dtype} with {x.dim()} dimensions, not {dtype} with {dims}")
    return x


def _answers(f, prefix: str, n: int, e: Expect) -> list[tuple[int, ...]]:
    tokens = _tensor(f, f"{prefix}.tokens", torch.int64, 1)
    lengths = _tensor(f, f"{prefix}.lengths", torch.int64, 1)
    if lengths.shape != (n,) or int(lengths.sum()) != tokens.numel():
        raise Unusable(f"{prefix} does not hold {n} answers")
    if bool((lengths < 0).any()) or bool((lengths > e.max_new_tokens).any()):
        raise Unusable(f"{prefix} has an answer longer than max_new_tokens {e.max_new_tokens}")
    if tokens.numel() and (int(tokens.min()) < 0 or (e.vocabulary is not None and int(tokens.max()) >= e.vocabulary)):
        raise Unusable(f"{prefix} has a token outside the vocabulary")
    out, at = [], 0
    for k in lengths.tolist():
        out.append(tuple(tokens[at:at + k].tolist()))
        at += k
    return out


def read_decodes(path: Path, n: int, e: Expect) -> Decodes:
    """A kept set of answers, every tensor checked against what this run expects
    (``Unusable`` says what does not fit)."""
    try:
        f = open_safetensors(path)
    except ZooError as err:
        raise Unusable(str(err)) from None
    if f.metadata.get("format") != FORMAT:
        raise Unusable("it is not zoo's teacher answers")
    greedy = _answers(f, "greedy", n, e)
    ended, confidence = _tensor(f, "ended", torch.uint8, 1), _tensor(f, "confidence", torch.float32, 1)
    if ended.shape != (n,) or confidence.shape != (n,) or bool((ended > 1).any()):
        raise Unusable(f"its ended flags or confidences are not {n} values")
    if not bool(torch.isfinite(confidence).all()) or bool((confidence < 0).any()) or bool((confidence > 1).any()):
        raise Unusable("a confidence is not a probability")
    view = state = None
    if e.sampled:
        view = _answers(f, "view", n, e)
        state = _tensor(f, "state", torch.uint8, 1)
        if state.numel() != torch.Generator().get_state().numel():
            raise Unusable("its sampler state is not a torch generator's")
    return Decodes(greedy, ended.to(torch.bool), confidence, view, state)


class RegistryDecodes:
    """A ``DecodeCache`` over the registry: task t's decodes are an artifact of its
    teacher ``teachers[t]`` where that is a registered model (None: not kept). A kept
    set that does not fit this run is logged and decoded anew, never used."""

    def __init__(self, registry: "Registry", teachers: list[str | None], base: str, expect: Expect,
                 log: Callable[[str], None] | None = None):
        self.registry, self.teachers, self.base, self.expect = registry, teachers, base, expect
        self.log = log or (lambda m: None)
        self.keys: list[str | None] = [None] * len(teachers)  # the artifact each task used, read or written

    def get(self, t: int, key: str) -> Decodes | None:
        ref = self.teachers[t]
        if ref is None:
            return None
        akey = artifact_key(key, ref, self.base)
        try:
            path = self.registry.artifact(ref, akey)
        except NotFound:
            return None
        try:
            decodes = read_decodes(path, self.expect.sizes[t], self.expect)
        except (Unusable, ZooError) as why:  # ZooError: a damaged file
            self.log(f"the {akey!r} artifact of {ref} cannot be used ({why}); decoding its answers anew")
            return None
        self.keys[t] = akey
        return decodes

    def put(self, t: int, key: str, decodes: Decodes) -> None:
        ref = self.teachers[t]
        if ref is None or not current().writes:  # across processes, rank 0 alone writes
            return
        from safetensors.torch import save_file

        akey = artifact_key(key, ref, self.base)
        tensors = {f"greedy.{k}": v for k, v in _pack(decodes.greedy).items()}
        tensors["ended"] = decodes.ended.to(torch.uint8)
        tensors["confidence"] = decodes.confidence.to(torch.float32)
        if decodes.view is not None:
            tensors.update({f"view.{k}": v for k, v in _pack(decodes.view).items()})
        if decodes.state is not None:
            tensors["state"] = decodes.state
        meta = {"format": FORMAT, "teacher": ref, "base": self.base, "prompts": str(len(decodes.greedy))}
        with tempfile.TemporaryDirectory(prefix="zoo-teacher-answers-") as tmp:
            path = Path(tmp) / f"{akey}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            entry = self.registry.attach_artifact(ref, akey, path)
        # the key may already hold other bytes (an unusable set, which stays): not this run's answers
        self.keys[t] = akey if entry["sha256"] == digest else None
