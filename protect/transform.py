"""The MergeLock transform: per-head invertible matrices on the QK and VO branches.

For each attention sublayer and each KV group g it draws two independent matrices:
A_g for the QK pair (A on W_Q, A^-T on W_K, biases included) and B_g for the VO pair
(B on W_V and its bias, B^-1 on W_O's input columns; the O bias stays). Then
q'ᵀk' = qᵀk and W_O'v' = W_O v, so the model computes the same function while its
weights leave the basin the other experts share (MergeLock, arXiv 2509.01548).

- Sampling bounds the condition number exactly: U·diag(s)·Vᵀ with Haar-orthogonal
  U and V and log-uniform s in [κ^-1/2, κ^1/2], so cond ≤ κ.
- Under RoPE the QK matrix may only be a per-frequency-pair scaled rotation, in the
  model's ``rotate_half`` pair layout (dims j and j + d/2); the q pair is scaled by s_j
  and the k pair by 1/s_j (they must commute with RoPE's 2×2 rotations). V is untouched by RoPE, so B stays general.
  With partial rotary (Phi, GPT-NeoX, GPT-J, StableLM) the pass-through dims get a
  general matrix. GPT-J's ``rotate_every_two`` pairs dims (2j, 2j + 1) instead.
- Under QK-norm (Qwen3, Gemma 3, OLMo 2) q and k are normalised before RoPE: no matrix
  on W_Q/W_K survives the norm, only a per-pair scale folded into the norm weights
  (shared by all heads when they share the weight). To make up for that weaker QK
  transform, KV groups and the query heads within each are also permuted.
- Under GQA every query head of a KV group shares its group's matrices (grouped-query attention).
- Matrices are drawn from the key's seed with a counter-based stream per sublayer and
  branch (PCG64 raw bits, turned into numbers here), so they depend on the key and the
  sublayer's name only, not on numpy's distribution code or the order of the tensors.
- The arithmetic is float64; results are cast back to the checkpoint's dtype.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from zoo.errors import ZooError

from zoo.protect.layouts import Attention

ALGORITHM = "mergelock"
VERSION = 1
# float32: 1e3, as MergeLock (arXiv 2509.01548) bounds it. Half precision: 30, not 1e2, which gave KL up
# to 1.2e-3 on tiny bf16 models (30: at most 2.3e-4; the gate is 1e-3). Measured in docs/results.md.
DEFAULT_MAX_COND = {"F32": 1e3, "F64": 1e3, "BF16": 30.0, "F16": 30.0}


@dataclass(frozen=True)
class Key:
    """What unlocks a protected model: a seed plus the algorithm, its version and parameters.

    The matrices themselves are never stored; they are drawn again from the seed.
    """

    seed: int
    max_cond: float
    algorithm: str = ALGORITHM
    version: int = VERSION

    @classmethod
    def new(cls, max_cond: float, seed: int | None = None) -> "Key":
        """A fresh key with a random 128-bit seed (or the given one, for reproducible runs)."""
        if not (math.isfinite(max_cond) and max_cond >= 1.0):
            raise ZooError(f"--max-cond must be a number ≥ 1, not {max_cond}")
        if seed is not None and seed < 0:
            raise ZooError("--seed must be a non-negative integer")
        return cls(secrets.randbits(128) if seed is None else seed, float(max_cond))

    def to_dict(self) -> dict[str, Any]:
        return {"algorithm": self.algorithm, "version": self.version, "seed": f"{self.seed:x}",
                "max_cond": self.max_cond}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Key":
        try:
            if d["algorithm"] != ALGORITHM:
                raise ZooError(f"this is a {d['algorithm']!r} key, not a {ALGORITHM} key")
            if int(d["version"]) != VERSION:
                raise ZooError(f"this key is for {ALGORITHM} version {d['version']}; this zoo has version {VERSION}")
            return cls(int(str(d["seed"]), 16), float(d["max_cond"]), ALGORITHM, VERSION)
        except (KeyError, ValueError, TypeError) as e:
            raise ZooError(f"not a valid {ALGORITHM} key ({e.__class__.__name__}: {e})") from None

    @property
    def material(self) -> bytes:
        """The whole key (seed, bound, algorithm, version) as canonical bytes."""
        return json.dumps(self.to_dict(), sort_keys=True).encode()

    @property
    def key_id(self) -> str:
        """A public fingerprint naming the key: 64 bits of an unsalted sha256 of the whole key.
        It reveals nothing of a random seed, but a small chosen seed can be found from it by
        trying seeds, as from the weights, and one key used twice shows the same id."""
        return hashlib.sha256(b"zoo-mergelock-key-id\0" + self.material).hexdigest()[:16]


class _Stream:
    """Numbers from PCG64's raw 64-bit output (stable across numpy versions)."""

    def __init__(self, seed: int, unit: str, branch: str):
        words = np.frombuffer(hashlib.sha256(f"{unit}\0{branch}".encode()).digest(), dtype="<u4")
        seq = np.random.SeedSequence(entropy=seed, spawn_key=tuple(int(w) for w in words))
        self._bits = np.random.PCG64(seq)

    def uniform(self, *shape: int) -> np.ndarray:
        """Uniform in (0, 1), 53 random bits each."""
        raw = self._bits.random_raw(math.prod(shape))
        return (((raw >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53).reshape(shape)

    def normal(self, *shape: int) -> np.ndarray:
        """Standard normal, by the Box-Muller transform."""
        n = math.prod(shape)
        u1, u2 = self.uniform(n), self.uniform(n)
        return (np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)).reshape(shape)


def _haar(stream: _Stream, n: int) -> np.ndarray:
    """A Haar-distributed orthogonal matrix: QR of a Gaussian with R's signs fixed."""
    q, r = np.linalg.qr(stream.normal(n, n))
    return q * np.sign(np.diag(r))


def _log_uniform(stream: _Stream, n: int, max_cond: float) -> np.ndarray:
    half = 0.5 * math.log(max_cond)
    return np.exp((2.0 * stream.uniform(n) - 1.0) * half)


@dataclass
class Pair:
    """A matrix per KV group and its inverse: [groups, d, d], float64."""

    fwd: torch.Tensor
    inv: torch.Tensor
    cond: float


def _general(stream: _Stream, groups: int, d: int, max_cond: float) -> Pair:
    fwd, inv, conds = [], [], []
    for _ in range(groups):
        u, v, s = _haar(stream, d), _haar(stream, d), _log_uniform(stream, d, max_cond)
        fwd.append((u * s) @ v.T)
        inv.append((v / s) @ u.T)
        conds.append(s.max() / s.min())
    return Pair(torch.from_numpy(np.stack(fwd)), torch.from_numpy(np.stack(inv)), float(max(conds)))


def _rope(stream: _Stream, groups: int, d: int, max_cond: float, rot: int | None = None,
          interleaved: bool = False) -> Pair:
    """M = ⊕_j s_j·Rot(φ_j) on the pairs (j, j + r/2) of the first r = ``rot`` dims (with
    ``interleaved``, GPT-J's pairs (2j, 2j + 1)); its inverse is ⊕_j Rot(-φ_j)/s_j. With
    partial rotary the d - r pass-through dims carry no position, so they get a general
    matrix C (cond ≤ κ, like the pair scales)."""
    rot = d if rot is None else rot
    half = rot // 2
    fwd, inv, conds = [], [], []
    for _ in range(groups):
        s, phi = _log_uniform(stream, half, max_cond), 2.0 * np.pi * stream.uniform(half)
        c, sn = np.cos(phi), np.sin(phi)
        m, mi = np.zeros((d, d)), np.zeros((d, d))
        j = np.arange(half)
        a, b = (2 * j, 2 * j + 1) if interleaved else (j, j + half)
        # [x_a, x_b] -> s·[c x_a - sn x_b, sn x_a + c x_b]
        m[a, a], m[a, b], m[b, a], m[b, b] = s * c, -s * sn, s * sn, s * c
        mi[a, a], mi[a, b], mi[b, a], mi[b, b] = c / s, sn / s, -sn / s, c / s
        scales = [s]
        if rot < d:
            u, v, t = _haar(stream, d - rot), _haar(stream, d - rot), _log_uniform(stream, d - rot, max_cond)
            m[rot:, rot:], mi[rot:, rot:] = (u * t) @ v.T, (v / t) @ u.T
            scales.append(t)
        fwd.append(m)
        inv.append(mi)
        every = np.concatenate(scales)
        conds.append(every.max() / every.min())
    return Pair(torch.from_numpy(np.stack(fwd)), torch.from_numpy(np.stack(inv)), float(max(conds)))


def _pair_scales(stream: _Stream, groups: int, d: int, max_cond: float) -> Pair:
    """Diagonal M = diag(s), one s_j per RoPE pair (j, j + d/2), repeated on both dims:
    all that commutes with both RoPE and a QK-norm's per-dim weights. Folded into the
    norm weights (q side ×s, k side ×1/s), it keeps qᵀk."""
    fwd, inv, conds = [], [], []
    for _ in range(groups):
        s = _log_uniform(stream, d // 2, max_cond)
        s = np.concatenate([s, s])
        fwd.append(np.diag(s))
        inv.append(np.diag(1.0 / s))
        conds.append(s.max() / s.min())
    return Pair(torch.from_numpy(np.stack(fwd)), torch.from_numpy(np.stack(inv)), float(max(conds)))


def _permutation(stream: _Stream, groups: int, size: int) -> torch.Tensor:
    """Query-head order: KV groups shuffled, then the query heads within each group.
    New head i takes old head ``perm[i]``, which stays in the group that moves with it."""
    kv = np.argsort(stream.uniform(groups), kind="stable")
    within = [np.argsort(stream.uniform(size), kind="stable") for _ in range(groups)]
    return torch.from_numpy(np.concatenate([kv[g] * size + within[g] for g in range(groups)]).astype(np.int64))


@dataclass
class Transforms:
    """One sublayer's matrices: ``qk`` is A (q side), ``vo`` is B; ``perm`` the query
    heads' new order (None: heads stay in place)."""

    qk: Pair
    vo: Pair
    perm: torch.Tensor | None = None


def draw(key: Key, att: Attention) -> Transforms:
    """The sublayer's matrices, drawn from the key and the sublayer's name."""
    qk_stream, vo_stream = _Stream(key.seed, att.unit, "qk"), _Stream(key.seed, att.unit, "vo")
    if att.qk_norm:  # one scale for all heads when they share the norm's weight, else one per KV group
        qk = _pair_scales(qk_stream, 1 if att.qk_norm == "head" else att.kv_heads, att.head_dim, key.max_cond)
    elif att.rope:
        qk = _rope(qk_stream, att.kv_heads, att.head_dim, key.max_cond, att.rotary, att.rope_pairs == "interleaved")
    else:
        qk = _general(qk_stream, att.kv_heads, att.head_dim, key.max_cond)
    vo = _general(vo_stream, att.kv_heads, att.head_dim, key.max_cond)
    perm = _permutation(_Stream(key.seed, att.unit, "perm"), att.kv_heads, att.group_size) if att.permute else None
    return Transforms(qk, vo, perm)


def _per_head(m: torch.Tensor, att: Attention) -> torch.Tensor:
    """Group matrices repeated for each query head (query head h uses KV group h // G)."""
    return m.repeat_interleave(att.group_size, dim=0) if att.group_size > 1 else m


def left_blocks(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Multiply each head's block of rows (or of a bias) by its matrix: [n·d, ...] by [n, d, d]."""
    n, d = m.shape[0], m.shape[1]
    return torch.matmul(m, w.reshape(n, d, -1)).reshape(w.shape)


def right_blocks(w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Multiply each head's block of columns by its matrix: [out, n·d] by [n, d, d]."""
    d = m.shape[1]
    if m.shape[0] * d != w.shape[1]:  # every column must be written: ``out`` starts uninitialised
        raise ValueError(f"{m.shape[0]} matrices of {d} for {w.shape[1]} columns")
    out = torch.empty_like(w)
    for h in range(m.shape[0]):  # per head: faster than one batched matmul over a strided view
        torch.matmul(w[:, h * d:(h + 1) * d], m[h], out=out[:, h * d:(h + 1) * d])
    return out


@dataclass
class Factors:
    """What each block of a sublayer is multiplied by, to lock (or to undo the lock).

    ``mats``: per query or KV head, from the left for q, k and v and from the right for o
    (column convention); per head (or one shared row) scale vectors for ``q_norm`` and
    ``k_norm``. A role with no entry is not multiplied. ``perm``/``perm_kv``: the heads'
    new order, applied before the matrices when locking and undone after them when
    unlocking.
    """

    mats: dict[str, torch.Tensor]
    perm: torch.Tensor | None = None
    perm_kv: torch.Tensor | None = None
    unlock: bool = False


def role_factors(t: Transforms, att: Attention, unlock: bool = False) -> Factors:
    """The factors that lock (or with ``unlock`` undo the lock of) one sublayer."""
    a, a_inv, b, b_inv = t.qk.fwd, t.qk.inv, t.vo.fwd, t.vo.inv
    if att.qk_norm:  # q and k weights stay (up to the permutation); the scales go into the norms
        s, s_inv = torch.diagonal(a, dim1=1, dim2=2), torch.diagonal(a_inv, dim1=1, dim2=2)
        mats = {"q_norm": s_inv if unlock else s, "k_norm": s if unlock else s_inv,
                "v": b_inv if unlock else b, "o": _per_head(b if unlock else b_inv, att)}
        if att.qk_norm == "full":
            mats["q_norm"] = _per_head(mats["q_norm"], att)
    elif unlock:
        mats = {"q": _per_head(a_inv, att), "k": a.transpose(1, 2), "v": b_inv, "o": _per_head(b, att)}
    else:
        mats = {"q": _per_head(a, att), "k": a_inv.transpose(1, 2), "v": b, "o": _per_head(b_inv, att)}
    perm_kv = None if t.perm is None else t.perm[::att.group_size] // att.group_size
    return Factors(mats, t.perm, perm_kv, unlock)


def column_blocks(att: Attention, role: str, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """A tensor's q, k, v or o blocks in column convention (rows of Q/K/V per head, columns
    of O per head): fused ``qkv`` weights are split (GPT-2's Conv1D ones transposed first)."""
    if role in ("qkv", "qkv_bias") and att.qkv_order == "grouped":
        return _split_grouped(att, w)
    if role in ("qkv", "qkv_bias"):  # [in, 3E] / [3E] (GPT-2) or [q + 2kv, in] (Phi-3), blocks Q | K | V
        q, kv = att.heads * att.head_dim, att.kv_heads * att.head_dim
        return dict(zip("qkv", (w.T if role == "qkv" and att.row_vectors else w).split([q, kv, kv], dim=0)))
    if role == "o":
        return {"o": w.T if att.row_vectors else w}
    if role in ("q_norm", "k_norm"):
        return {role: w}
    return {_side(role): w}


def from_column_blocks(att: Attention, role: str, blocks: dict[str, torch.Tensor]) -> torch.Tensor:
    """The inverse of ``column_blocks``."""
    if role in ("qkv", "qkv_bias") and att.qkv_order == "grouped":
        return _join_grouped(att, blocks)
    if role in ("qkv", "qkv_bias"):
        y = torch.cat([blocks[b] for b in "qkv"], dim=0)
        return y.T if role == "qkv" and att.row_vectors else y
    if role == "o":
        return blocks["o"].T if att.row_vectors else blocks["o"]
    if role in ("q_norm", "k_norm"):
        return blocks[role]
    return blocks[_side(role)]


def _side(role: str) -> str:
    """The block a separate weight or bias is multiplied as: its own, except DeBERTa-v2's
    relative position projections (``pos_q``, ``pos_k``), which take the q and k side's."""
    return role.removesuffix("_bias").removeprefix("pos_")


def _split_grouped(att: Attention, w: torch.Tensor) -> dict[str, torch.Tensor]:
    """Fused rows per KV group: its G query heads, its K head, its V head ([n, G + 2, d];
    GPT-NeoX, BLOOM and Falcon, where with G = 1 that is per head q, k, v)."""
    n, g, d = att.kv_heads, att.group_size, att.head_dim
    x = w.reshape(n, g + 2, d, *w.shape[1:])
    return {"q": x[:, :g].reshape(n * g * d, *w.shape[1:]), "k": x[:, g].reshape(n * d, *w.shape[1:]),
            "v": x[:, g + 1].reshape(n * d, *w.shape[1:])}


def _join_grouped(att: Attention, blocks: dict[str, torch.Tensor]) -> torch.Tensor:
    """The inverse of ``_split_grouped``."""
    n, g, d = att.kv_heads, att.group_size, att.head_dim
    rest = blocks["q"].shape[1:]
    parts = [blocks["q"].reshape(n, g, d, *rest), blocks["k"].reshape(n, 1, d, *rest),
             blocks["v"].reshape(n, 1, d, *rest)]
    return torch.cat(parts, dim=1).reshape(n * (g + 2) * d, *rest)


def _permute(b: str, p: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """Reorder a block's heads: rows (or, for o, columns) taken in ``order``."""
    n = order.shape[0]
    if b == "o":
        return p.reshape(p.shape[0], n, -1)[:, order].reshape(p.shape)
    return p.reshape(n, -1)[order].reshape(p.shape)


def _multiply(f: Factors, att: Attention, b: str, p: torch.Tensor) -> torch.Tensor:
    m = f.mats.get(b)
    if m is None:
        return p
    if b in ("q_norm", "k_norm"):  # weight w acts as (w + offset); the scale multiplies that
        off = att.norm_offset
        return ((p.reshape(m.shape[0], -1) + off) * m - off).reshape(p.shape)
    return right_blocks(p, m) if b == "o" else left_blocks(p, m)


def apply(f: Factors, att: Attention, role: str, w: torch.Tensor) -> torch.Tensor:
    """Multiply one tensor of the sublayer by its ``role_factors``, in float64 (a tensor that
    is only permuted stays in its own dtype)."""
    if any(b in f.mats for b in column_blocks(att, role, w)):
        x = torch.empty(w.shape, dtype=torch.float64).copy_(w)
    else:  # only permuted (QK-norm models' W_Q and W_K): exact in the tensor's own dtype
        x = w
    blocks = {}
    for b, p in column_blocks(att, role, x).items():
        order = f.perm if b in ("q", "o", "q_norm") else f.perm_kv
        if b in ("q_norm", "k_norm") and att.qk_norm != "full":
            order = None  # one weight shared by all heads: nothing to reorder
        if order is not None and not f.unlock:
            p = _permute(b, p, order)
        p = _multiply(f, att, b, p)
        if order is not None and f.unlock:
            p = _permute(b, p, torch.argsort(order))
        blocks[b] = p
    return from_column_blocks(att, role, blocks).to(w.dtype).contiguous()
