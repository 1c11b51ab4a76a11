"""Generative experts' answers to their task's pool, kept as lineage artifacts of the
expert, so a later parity run with the same prompts and decode settings reads them
back instead of decoding again (decoding is most of what annotating a pool costs).

An artifact is one safetensors file per expert and decode key
(``merge.learned.generative_parity.decodes_key``, mixed with the base and the teacher
it was decoded by): the greedy answers' tokens (``greedy.tokens``, ``greedy.lengths``),
``ended`` and ``confidence`` per prompt, the sampled view's tokens when there is one
(``view.tokens``, ``view.lengths``), and the sampling generator's state after them
(``state``). Only registered teachers keep theirs; the others decode every run.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
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


def artifact_key(key: str, teacher: str, base: str | None) -> str:
    """The artifact's key: the decode key, the teacher's ref and the base it adds its
    task vector to (an expert teaches as base + its task vector)."""
    blob = json.dumps({"decodes": key, "teacher": teacher, "base": base}, sort_keys=True)
    return PREFIX + hashlib.sha256(blob.encode()).hexdigest()[:16]


def _pack(answers: list[tuple[int, ...]]) -> dict[str, torch.Tensor]:
    flat = [x for a in answers for x in a]
    return {"tokens": torch.tensor(flat, dtype=torch.int64), "lengths": torch.tensor([len(a) for a in answers],
                                                                                     dtype=torch.int64)}


def _unpack(tokens: torch.Tensor, lengths: torch.Tensor, n: int, label: str) -> list[tuple[int, ...]]:
    if lengths.shape != (n,) or int(lengths.sum()) != tokens.numel() or bool((lengths < 0).any()):
        raise ZooError(f"{label} does not hold {n} answers; delete it or run with other decode settings")
    out, at = [], 0
    for k in lengths.tolist():
        out.append(tuple(tokens[at:at + k].tolist()))
        at += k
    return out


class RegistryDecodes:
    """A ``DecodeCache`` over the registry: task t's decodes are an artifact of its
    teacher ``teachers[t]`` where that is a registered model (None: not kept)."""

    def __init__(self, registry: "Registry", teachers: list[str | None], base: str | None, sizes: list[int]):
        self.registry, self.teachers, self.base, self.sizes = registry, teachers, base, sizes
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
        label = f"the {akey!r} artifact of {ref}"
        f = open_safetensors(path)
        if f.metadata.get("format") != FORMAT:
            raise ZooError(f"{label} is not zoo's teacher answers")
        need = {"greedy.tokens", "greedy.lengths", "ended", "confidence"}
        if not need <= set(f.tensors):
            raise ZooError(f"{label} lacks {sorted(need - set(f.tensors))}; it is not zoo's teacher answers")
        n = self.sizes[t]
        greedy = _unpack(f.read_tensor("greedy.tokens"), f.read_tensor("greedy.lengths"), n, label)
        ended, confidence = f.read_tensor("ended"), f.read_tensor("confidence")
        if ended.shape != (n,) or confidence.shape != (n,):
            raise ZooError(f"{label} does not hold {n} answers; delete it or run with other decode settings")
        view = (_unpack(f.read_tensor("view.tokens"), f.read_tensor("view.lengths"), n, label)
                if "view.tokens" in f.tensors else None)
        state = f.read_tensor("state") if "state" in f.tensors else None
        self.keys[t] = akey
        return Decodes(greedy, ended.to(torch.bool), confidence.to(torch.float32), view, state)

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
        meta = {"format": FORMAT, "teacher": ref, "base": self.base or "", "prompts": str(len(decodes.greedy))}
        with tempfile.TemporaryDirectory(prefix="zoo-teacher-answers-") as tmp:
            path = Path(tmp) / f"{akey}.safetensors"
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=meta)
            self.registry.attach_artifact(ref, akey, path)
        self.keys[t] = akey
