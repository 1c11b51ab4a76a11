"""The data-free least-squares realignment attack on MergeLock (spec A.8), as a red team.

Given only the protected model and the public base it was fine-tuned from, solve per
head X = argmin ‖X·W′ − W_base‖ (for O, from the right) and replace W′ by X·W′. A
fine-tuned W is close to W_base, so X lands close to the inverse transform: the
recovered task vector keeps most of its norm. This is why MergeLock only stops naive
merging; the demo measures how much of the merge the attack brings back.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zoo.checkpoint import Checkpoint
from zoo.errors import ZooError
from zoo.writer import copy_sidecars

from .layouts import Attention, layout_for
from .lock import stream_attention
from .transform import left_blocks, right_blocks

if TYPE_CHECKING:
    from zoo.registry import Registry


def _solve_left(locked: torch.Tensor, base: torch.Tensor, n: int) -> torch.Tensor:
    """Per block of rows, X minimising ‖X·locked − base‖: [n, d, d]."""
    d = locked.shape[0] // n
    a, b = locked.reshape(n, d, -1), base.reshape(n, d, -1)
    return torch.linalg.lstsq(a.transpose(1, 2), b.transpose(1, 2)).solution.transpose(1, 2)


def _solve_right(locked: torch.Tensor, base: torch.Tensor, n: int) -> torch.Tensor:
    """Per block of columns, Z minimising ‖locked·Z − base‖: [n, d, d]."""
    out, d = locked.shape[0], locked.shape[1] // n
    a, b = locked.reshape(out, n, d).transpose(0, 1), base.reshape(out, n, d).transpose(0, 1)
    return torch.linalg.lstsq(a, b).solution


def _heads(att: Attention, block: str) -> int:
    return att.heads if block in ("q", "o") else att.kv_heads


def _realign_blocks(att: Attention, role: str, locked: torch.Tensor, locked_w: torch.Tensor,
                    base_w: torch.Tensor) -> torch.Tensor:
    """Realign one column-convention tensor (weight or bias) of block ``role``, fitting
    X on the block's weights."""
    n = _heads(att, role)
    return left_blocks(locked, _solve_left(locked_w, base_w, n))


def realign_tensor(att: Attention, role: str, locked: torch.Tensor, locked_sibling: torch.Tensor | None,
                   base_weight: torch.Tensor) -> torch.Tensor:
    """One attention tensor realigned on the base. For a bias, ``locked_sibling`` is its
    weight (X is fitted on weights); ``base_weight`` is the base's weight of the block."""
    dtype = locked.dtype
    t, base = locked.to(torch.float64), base_weight.to(torch.float64)
    w = t if locked_sibling is None else locked_sibling.to(torch.float64)
    if role == "o":
        if att.row_vectors:
            z = _solve_right(t.T, base.T, att.heads)
            out = right_blocks(t.T, z).T
        else:
            out = right_blocks(t, _solve_right(t, base, att.heads))
    elif role in ("qkv", "qkv_bias"):
        wc, bc = w.T, base.T  # column convention: [3E, in]
        tc = t.T if role == "qkv" else t
        parts = [_realign_blocks(att, blk, tp, wp, bp)
                 for blk, tp, wp, bp in zip("qkv", tc.chunk(3, 0), wc.chunk(3, 0), bc.chunk(3, 0))]
        out = torch.cat(parts, 0)
        out = out.T if role == "qkv" else out
    else:
        out = _realign_blocks(att, role.removesuffix("_bias"), t, w, base)
    return out.to(dtype).contiguous()



def realign_checkpoint(locked: Checkpoint, base: Checkpoint, folder: Path) -> dict[str, str]:
    """Write the realigned model into ``folder`` (existing, empty); return its digests."""
    layout = layout_for(locked)

    def weight_of(att: Attention, role: str) -> str:
        return att.tensors[role.removesuffix("_bias")]

    def fn(att: Attention, role: str, name: str, t: torch.Tensor) -> torch.Tensor:
        wname = weight_of(att, role)
        if wname not in base.tensors:
            raise ZooError(f"the base has no {wname}; the attack needs the protected model's own base")
        sibling = locked.read_tensor(wname) if role.endswith("_bias") else None
        return realign_tensor(att, role, t, sibling, base.read_tensor(wname))

    digests, _, _ = stream_attention(locked, folder, fn, layout, desc="realigning")
    return {**digests, **copy_sidecars(locked, folder)}


def realign(registry: "Registry", protected: str, out: str) -> dict[str, Any]:
    """Run the attack on a registered protected model against its registered base and
    register the result (kind ``expert``, tagged ``realigned``) for measuring."""
    info = registry.show(protected)
    if info["base"] is None:
        raise ZooError(f"{protected} has no registered base; the attack needs the public base model")
    folder = registry.store.temp_path(".realign")
    folder.mkdir(parents=True)
    try:
        digests = realign_checkpoint(registry.checkpoint(info["ref"]), registry.checkpoint(info["base"]), folder)
        return registry.add(folder, out, "expert", base=info["base"], parents=[("source", info["ref"])],
                            recipe={"method": "realign-attack", "source": info["ref"], "base": info["base"]},
                            tasks=info["tasks"], tags=["realigned"], adopt=digests, check_base=False,
                            metadata=info["metadata"] or None)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
