"""The data-free least-squares realignment attack on MergeLock (MergeLock, arXiv 2509.01548: its security caveats), as a red team.

Given only the protected model and the public base it was fine-tuned from, solve per
head X = argmin ‖X·W′ − W_base‖ (for O, from the right) and replace W′ by X·W′. A
fine-tuned W is close to W_base, so X lands close to the inverse transform: the
recovered task vector keeps most of its norm. This is why MergeLock only stops naive
merging; the demo measures how much of the merge the attack brings back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zoo.checkpoints.reader import Checkpoint
from zoo.errors import ZooError
from zoo.checkpoints.writer import copy_sidecars
from zoo.registry.destination import Destination
from zoo.registry.records import NewModel

from zoo.protect.layouts import Attention, layout_for
from zoo.protect.lock import stream_attention
from zoo.protect.transform import column_blocks, from_column_blocks, left_blocks, right_blocks

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


def realign_tensor(att: Attention, role: str, locked: torch.Tensor, locked_weight: torch.Tensor,
                   base_weight: torch.Tensor) -> torch.Tensor:
    """One attention tensor realigned on the base: per head, the matrix that best maps
    ``locked_weight`` (the tensor itself, or for a bias its weight) onto ``base_weight``
    (the base's weight of the same name) is applied to ``locked``."""
    def f64(t: torch.Tensor) -> dict[str, torch.Tensor]:
        return column_blocks(att, role.removesuffix("_bias"), t.to(torch.float64))

    w, base = f64(locked_weight), f64(base_weight)
    blocks = {}
    for b, p in column_blocks(att, role, locked.to(torch.float64)).items():
        if b == "o":
            blocks[b] = right_blocks(p, _solve_right(p, base[b], att.heads))
        else:
            blocks[b] = left_blocks(p, _solve_left(w[b], base[b], att.heads if b == "q" else att.kv_heads))
    return from_column_blocks(att, role, blocks).to(locked.dtype).contiguous()


def realign_checkpoint(locked: Checkpoint, base: Checkpoint, folder: Path) -> dict[str, str]:
    """Write the realigned model into ``folder`` (existing, empty); return its digests."""
    layout = layout_for(locked)

    def fn(att: Attention, role: str, name: str, t: torch.Tensor) -> torch.Tensor:
        if role in ("q_norm", "k_norm"):  # no weight to fit a per-head matrix on: left as locked
            return t
        wname = att.tensors[role.removesuffix("_bias")]
        if wname not in base.tensors:
            raise ZooError(f"the base has no {wname}; the attack needs the protected model's own base")
        weight = locked.read_tensor(wname) if role.endswith("_bias") else t
        return realign_tensor(att, role, t, weight, base.read_tensor(wname))

    digests, _, _ = stream_attention(locked, folder, fn, layout, desc="realigning")
    return {**digests, **copy_sidecars(locked, folder, heads=True)}


def realign(registry: "Registry", protected: str, out: str) -> dict[str, Any]:
    """Run the attack on a registered protected model against its registered base and
    register the result (kind ``expert``, tagged ``realigned``) for measuring."""
    info = registry.show(protected)
    if info["base"] is None:
        raise ZooError(f"{protected} has no registered base; the attack needs the public base model")
    dest = Destination.check(out, None, registry)
    with dest.workspace(".realign") as folder:
        digests = realign_checkpoint(registry.checkpoint(info["ref"]), registry.checkpoint(info["base"]), folder)
        return dest.keep(NewModel(folder, out, "expert", digests, base=info["base"], parents=[("source", info["ref"])],
                                  recipe={"method": "realign-attack", "source": info["ref"], "base": info["base"]},
                                  tasks=info["tasks"], tags=["realigned"], metadata=info["metadata"] or None))
