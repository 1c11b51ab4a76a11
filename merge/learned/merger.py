"""The trainable part of a learned merge: merge coefficients and a Concrete mask over
frozen task vectors, producing merged parameters for ``torch.func.functional_call``.

θ = θ₀ + Σᵢ wᵢ · (m ⊙ τᵢ) / mean(m), per tensor. The mask m is shared by every task
(arXiv 2312.06173), so the sum is computed as m ⊙ Σᵢ wᵢτᵢ. Every tensor lives in one flat
vector (masked tensors first), so a step is a few large operations, not a few per
tensor: that is what keeps a GPU busy. With fixed weights Σᵢ wᵢτᵢ is computed once,
in task arithmetic's order, so an all-ones mask gives task arithmetic's bits.

The whole chain, from the mask logits and the draw's noise through σ, the per-tensor
rescale and Σᵢ wᵢτᵢ to θ, is one autograd node (``_Merge``) that keeps only σ and
Σᵢ wᵢτᵢ for its backward: autograd's own graph would also keep the rescaled mask, its
divisor and, layer-wise, one model-sized coefficient vector per task.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from zoo.errors import ZooError

COEFFICIENTS = ("fixed", "task", "layer")
# the mask folded into the saved model: one relaxed draw (fusion_bench's default) or one binary draw
FINAL_MASKS = ("relaxed", "bernoulli")


@dataclass
class MaskSample:
    """One draw of the mask, already divided by its per-tensor mean: per tensor in
    ``values``, and as one vector over the masked tensors in ``flat`` when known."""

    values: dict[str, torch.Tensor]
    flat: torch.Tensor | None = None


class Draw:
    """One RelaxedBernoulli draw of the mask, kept as its logistic noise: the merge
    computes σ((logits + noise) / T) / mean inside its one autograd node. ``values`` and
    ``flat`` materialise the rescaled mask (differentiable in the logits) when asked."""

    def __init__(self, merger: "Merger", noise: torch.Tensor, detached: bool = False):
        self.merger, self.noise, self.detached = merger, noise, detached

    def detach(self) -> "Draw":
        """The same draw, with no gradient to the logits."""
        return Draw(self.merger, self.noise, True)

    @property
    def flat(self) -> torch.Tensor:
        x = self.merger.logit_flat.detach() if self.detached else self.merger.logit_flat
        m = torch.sigmoid((x + self.noise) / self.merger.temperature)
        return m / self.merger.per_tensor_mean(m).clamp_min(torch.finfo(m.dtype).tiny)

    @property
    def values(self) -> dict[str, torch.Tensor]:
        return self.merger.views(self.flat, masked_only=True)


Mask = MaskSample | Draw


class Merger(nn.Module):
    """Task vectors (frozen) plus the learned coefficients and mask logits.

    ``coefficients``: ``fixed`` (all ``init``), ``task`` (one per task) or ``layer``
    (one per task and parameter tensor, as "layer-wise" means in the papers).
    ``mask``: None, or a regex choosing which tensors get mask logits (one per element,
    initialised at 0, i.e. keep probability 0.5).
    """

    def __init__(self, base: dict[str, torch.Tensor], task_vectors: list[dict[str, torch.Tensor]], *,
                 coefficients: str = "task", init: float = 0.3, clamp: bool = False, mask: str | None = None,
                 temperature: float = 0.5, device: torch.device | str = "cpu"):
        super().__init__()
        if coefficients not in COEFFICIENTS:
            raise ZooError(f"coefficients must be one of {', '.join(COEFFICIENTS)}, not {coefficients!r}")
        if not task_vectors:
            raise ZooError("a learned merge needs at least one expert")
        names = list(base)
        self.mask_names: list[str] = []
        if mask is not None:
            try:
                pattern = re.compile(mask)
            except re.error as e:
                raise ZooError(f"mask pattern {mask!r} is not a valid regular expression: {e}") from None
            self.mask_names = [n for n in names if pattern.search(n)]
            if not self.mask_names:
                raise ZooError(f"mask pattern {mask!r} matches none of the {len(names)} merged tensors "
                               f"(e.g. {', '.join(names[:3])})")
        masked = set(self.mask_names)
        self.names = self.mask_names + [n for n in names if n not in masked]  # flat layout order
        self.shapes = [tuple(base[n].shape) for n in self.names]
        self.sizes = [base[n].numel() for n in self.names]
        self.total = sum(self.sizes)
        self.masked_total = sum(self.sizes[:len(self.mask_names)])
        self.base_flat = torch.cat([base[n].reshape(-1).to(device, torch.float32) for n in self.names])
        self.tv_flat: list[torch.Tensor] | None = [
            torch.cat([tv[n].reshape(-1).to(device, torch.float32) for n in self.names]) for tv in task_vectors]
        self.n_tasks = len(task_vectors)
        self.mode, self.init, self.clamp, self.temperature = coefficients, init, clamp, temperature
        shape = {"fixed": (self.n_tasks, 1), "task": (self.n_tasks, 1), "layer": (self.n_tasks, len(self.names))}
        w = torch.full(shape[coefficients], float(init), device=device)
        if coefficients == "fixed":
            self.register_buffer("weights", w)
        else:
            self.weights = nn.Parameter(w)
        self.logit_flat = nn.Parameter(torch.zeros(self.masked_total, device=device))
        self._sizes_t = torch.tensor(self.sizes, device=device)
        self._fixed_delta: torch.Tensor | None = None

    # -- per-tensor views ------------------------------------------------------------------
    @property
    def base(self) -> dict[str, torch.Tensor]:
        return self.views(self.base_flat)

    @property
    def tv(self) -> dict[str, list[torch.Tensor]]:
        if self.tv_flat is None:
            raise ZooError("this merge let go of its task vectors (release_task_vectors)")
        views = [self.views(t) for t in self.tv_flat]
        return {n: [v[n] for v in views] for n in self.names}

    def views(self, flat: torch.Tensor, masked_only: bool = False) -> dict[str, torch.Tensor]:
        """Per-tensor views of a flat vector over all tensors (or the masked ones)."""
        k = len(self.mask_names) if masked_only else len(self.names)
        parts = flat.split(self.sizes[:k])
        return {n: p.view(shape) for n, p, shape in zip(self.names[:k], parts, self.shapes)}

    @property
    def logits(self) -> list[torch.Tensor]:
        return list(self.views(self.logit_flat, masked_only=True).values())

    # -- coefficients -------------------------------------------------------------------
    def coefficient_matrix(self) -> torch.Tensor:
        """[tasks, tensors] coefficients, clamped to [0, 1] when asked."""
        w = self.weights.clamp(0, 1) if self.clamp else self.weights
        return w.expand(self.n_tasks, len(self.names))

    def set_coefficients(self, matrix: torch.Tensor) -> None:
        """Start from given [tasks, tensors] coefficients (tensors in ``names`` order)."""
        matrix = matrix.to(self.weights.device, torch.float32)
        if self.weights.shape[1] == 1:
            if not torch.equal(matrix, matrix[:, :1].expand_as(matrix)):
                raise ZooError("these coefficients differ between tensors; use coefficients: layer")
            matrix = matrix[:, :1]
        with torch.no_grad():
            self.weights.copy_(matrix)
        self._fixed_delta = None

    def set_logits(self, logits: dict[str, torch.Tensor]) -> None:
        """Start the mask from given logits (per masked tensor)."""
        with torch.no_grad():
            self.logit_flat.copy_(torch.cat([logits[n].reshape(-1).to(self.logit_flat) for n in self.mask_names]))

    def reset_coefficients(self) -> None:
        with torch.no_grad():
            self.weights.fill_(self.init)

    # -- the mask -------------------------------------------------------------------------
    @property
    def mask_sizes(self) -> torch.Tensor:
        """The masked tensors' element counts, on the device."""
        return self._sizes_t[:len(self.mask_names)]

    def tensor_means(self, m: torch.Tensor) -> torch.Tensor:
        """The mean of a flat mask over each masked tensor: one value per tensor."""
        return torch.stack([part.mean() for part in m.split(self.sizes[:len(self.mask_names)])])

    def per_tensor_mean(self, m: torch.Tensor) -> torch.Tensor:
        """Each element's tensor's mean, as a flat vector beside ``m``."""
        k = len(self.mask_names)
        return self.tensor_means(m).repeat_interleave(self._sizes_t[:k], output_size=self.masked_total)

    def sample(self, generator: torch.Generator) -> Draw:
        """A RelaxedBernoulli(temperature, logits) draw, reparameterised so gradients reach
        the logits, each tensor divided by its mean. ``generator`` lives on the logits'
        device (drawing a model's worth of noise on the CPU would dominate a GPU step)."""
        x = self.logit_flat
        u = torch.rand(x.shape, generator=generator, device=x.device)
        u = u.clamp_(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps)
        return Draw(self, u.log() - (-u).log1p())

    def draw_bits(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One Bernoulli(σ(logit)) draw per element: fusion_bench's ``discrete``
        evaluation mask, stored as bits."""
        x = self.logit_flat.detach()
        u = torch.rand(x.shape, generator=generator, device=x.device)
        bits = (u < torch.sigmoid(x)).to(torch.float32)
        return {n: v.clone() for n, v in self.views(bits, masked_only=True).items()}

    def draw_relaxed(self, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One RelaxedBernoulli(temperature, logit) draw per element, values in [0, 1]
        before the per-tensor rescale: fusion_bench's default (``continuous``)
        evaluation mask. Uses the same noise as a training step's ``sample``."""
        x = self.logit_flat.detach()
        u = torch.rand(x.shape, generator=generator, device=x.device)
        u = u.clamp_(torch.finfo(u.dtype).tiny, 1 - torch.finfo(u.dtype).eps)
        m = torch.sigmoid((x + (u.log() - (-u).log1p())) / self.temperature)
        return {n: v.clone() for n, v in self.views(m, masked_only=True).items()}

    def draw_final(self, kind: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The mask folded into the saved model: ``relaxed`` (the reference's default)
        or ``bernoulli`` (binary)."""
        if kind not in FINAL_MASKS:
            raise ZooError(f"final_mask must be one of {', '.join(FINAL_MASKS)}, not {kind!r}")
        return self.draw_relaxed(generator) if kind == "relaxed" else self.draw_bits(generator)

    def logits_dict(self) -> dict[str, torch.Tensor]:
        return {n: v.detach() for n, v in self.views(self.logit_flat, masked_only=True).items()}

    # -- the merged parameters ------------------------------------------------------------
    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        """Σᵢ wᵢτᵢ over the flat vector, in task order (no graph: the merge's autograd
        node differentiates it)."""
        if self.mode == "fixed" and self._fixed_delta is not None:
            return self._fixed_delta
        if self.tv_flat is None:
            raise ZooError("this merge let go of its task vectors (release_task_vectors); it cannot re-weight them")
        w = w.detach()
        w = w.clamp(0, 1) if self.clamp else w
        acc = None
        for i, tv in enumerate(self.tv_flat):
            wi = w[i, 0] if w.shape[1] == 1 else w[i].repeat_interleave(self._sizes_t, output_size=self.total)
            term = tv * wi
            acc = term if acc is None else acc.add_(term)
            del term, wi
        assert acc is not None
        if self.mode == "fixed":
            self._fixed_delta = acc
        return acc

    def weights_grad(self, g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """d/dw of Σᵢ wᵢτᵢ against the gradient ``g`` of the flat sum: per task (and
        tensor, layer-wise) the sum of g ⊙ τᵢ; zero outside [0, 1] when clamped."""
        assert self.tv_flat is not None
        if w.shape[1] == 1:
            grad = torch.stack([(g * tv).sum() for tv in self.tv_flat]).unsqueeze(1)
        else:
            grad = torch.stack([torch.segment_reduce(g * tv, "sum", lengths=self._sizes_t) for tv in self.tv_flat])
        if self.clamp:
            grad = grad * ((w >= 0) & (w <= 1))
        return grad.to(w.dtype)

    def release_task_vectors(self) -> None:
        """Fixed coefficients: keep Σᵢ wᵢτᵢ, let go of the task vectors themselves (at
        ViT-B/32 size and 8 tasks, 2.8 GB)."""
        if self.mode != "fixed":
            raise ZooError("only fixed coefficients can let go of the task vectors")
        self.weighted_sum(self.weights)
        self.tv_flat = None

    def merged(self, mask: Mask | None = None) -> dict[str, torch.Tensor]:
        """θ₀ + m ⊙ Σᵢ wᵢτᵢ for every merged tensor (differentiable in w and the logits)."""
        if mask is None or not self.mask_names:
            return self.views(_Merge.apply(self.weights, None, None, None, self))
        if isinstance(mask, Draw):
            logits = self.logit_flat.detach() if mask.detached else self.logit_flat
            return self.views(_Merge.apply(self.weights, logits, mask.noise, None, self))
        m = mask.flat if mask.flat is not None else \
            torch.cat([mask.values[n].reshape(-1) for n in self.mask_names]).to(self.base_flat.device)
        if not m.requires_grad:
            return self.views(_Merge.apply(self.weights, None, None, m, self))
        # a mask that carries its own graph: autograd through the plain chain
        delta = _Differentiable.apply(self.weights, self)
        k = self.masked_total
        return self.views(torch.cat([self.base_flat[:k] + delta[:k] * m, self.base_flat[k:] + delta[k:]]))

    def coefficients_list(self) -> list[list[float]]:
        """[task][tensor] coefficients, tensors in the merger's name order (``names``)."""
        return self.coefficient_matrix().detach().cpu().tolist()


class _Merge(torch.autograd.Function):
    """θ = θ₀ + m ⊙ Σᵢ wᵢτᵢ as one node, m either σ((logits + noise)/T) rescaled by its
    per-tensor mean, or a given mask without a graph (none: unmasked). The forward is the
    plain chain's arithmetic, op for op; the backward keeps only σ and Σᵢ wᵢτᵢ.

    With s = σ(z), z = (x + noise)/T, μⱼ = mean of s over tensor j (nⱼ elements) and
    m = s/μⱼ: ∂L/∂s = gₘ/μⱼ − Σⱼ(gₘ·s)/(μⱼ²·nⱼ) with gₘ = g ⊙ Σᵢ wᵢτᵢ, and
    ∂L/∂x = ∂L/∂s · s(1 − s)/T."""

    @staticmethod
    def forward(ctx, weights, logits, noise, given, merger):  # noqa: D401
        delta = merger.weighted_sum(weights)
        base, k = merger.base_flat, merger.masked_total
        s = m = None
        if noise is not None:
            s = torch.sigmoid((logits + noise) / merger.temperature)
            m = s / merger.per_tensor_mean(s).clamp_min(torch.finfo(s.dtype).tiny)
        elif given is not None:
            m = given
        flat = base + delta if m is None else torch.cat([base[:k] + delta[:k] * m, base[k:] + delta[k:]])
        # the coefficients as merged (a stage-1 reset may change them before the backward)
        ctx.merger, ctx.delta, ctx.s, ctx.given, ctx.w = merger, delta, s, given, weights.detach().clone()
        return flat

    @staticmethod
    def backward(ctx, g):
        merger, delta, s, given = ctx.merger, ctx.delta, ctx.s, ctx.given
        k = merger.masked_total
        sizes = merger.mask_sizes
        means = mean = None
        if s is not None:  # recomputed, as in the forward
            means = merger.tensor_means(s).clamp_min(torch.finfo(s.dtype).tiny)
            mean = means.repeat_interleave(sizes, output_size=k)
        m = s / mean if s is not None else given
        grad_w = grad_x = None
        if ctx.needs_input_grad[0]:
            gd = g if m is None else torch.cat([g[:k] * m, g[k:]])
            grad_w = merger.weights_grad(gd, ctx.w)
            del gd
        if ctx.needs_input_grad[1]:
            assert s is not None and mean is not None and means is not None
            gm = g[:k] * delta[:k]
            dot = torch.segment_reduce(gm * s, "sum", lengths=sizes)
            correction = (dot / (means * means * sizes)).repeat_interleave(sizes, output_size=k)
            grad_x = (gm / mean - correction) * s * (1 - s) / merger.temperature
        return grad_w, grad_x, None, None, None


class _Differentiable(torch.autograd.Function):
    """Σᵢ wᵢτᵢ differentiable in w, for a mask that carries its own graph."""

    @staticmethod
    def forward(ctx, weights, merger):
        ctx.merger, ctx.w = merger, weights.detach().clone()
        return merger.weighted_sum(weights).clone() if merger.mode == "fixed" else merger.weighted_sum(weights)

    @staticmethod
    def backward(ctx, g):
        merger = ctx.merger
        return (merger.weights_grad(g, ctx.w) if ctx.needs_input_grad[0] else None), None


# -- packing the final mask for the lineage ---------------------------------------------------
def pack_mask(bits: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A binary mask as bytes, 8 elements a byte (numpy.packbits order)."""
    return {n: torch.from_numpy(np.packbits(m.detach().cpu().reshape(-1).numpy() > 0)) for n, m in bits.items()}


def unpack_mask(packed: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    out = {}
    for n, b in packed.items():
        count = int(np.prod(shapes[n])) if shapes[n] else 1
        out[n] = torch.from_numpy(np.unpackbits(b.numpy())[:count].astype(np.float32)).reshape(shapes[n])
    return out


def rescale(mask: dict[str, torch.Tensor]) -> MaskSample:
    """A mask draw (binary or relaxed) divided by its per-tensor mean, as applied to the merge."""
    return MaskSample({n: m / m.mean().clamp_min(torch.finfo(torch.float32).tiny) for n, m in mask.items()})


def mask_stats(logits: dict[str, torch.Tensor]) -> dict[str, float]:
    """How much of a learned mask is a subspace, over every masked element with keep
    probability p = σ(logit): ``above_half``, the fraction with p > ½ (what a draw keeps
    more often than not); ``binariness``, mean |2p − 1| (0: every p at ½, a soft
    re-weighting; 1: every p at 0 or 1, a fixed subspace); ``mean_keep``, mean p; and
    ``mean_abs_logit``."""
    x = torch.cat([v.detach().reshape(-1).float().cpu() for v in logits.values()])
    if x.numel() == 0:
        return {"above_half": 0.0, "binariness": 0.0, "mean_keep": 0.0, "mean_abs_logit": 0.0}
    p = torch.sigmoid(x)
    return {"above_half": float((p > 0.5).float().mean()), "binariness": float((2 * p - 1).abs().mean()),
            "mean_keep": float(p.mean()), "mean_abs_logit": float(x.abs().mean())}


def is_binary(mask: dict[str, torch.Tensor]) -> bool:
    return all(bool(((m == 0) | (m == 1)).all()) for m in mask.values())


MASK_FORMAT = "zoo-mask-v1"
LOGIT_SCALE = 16  # int8 logits: round(clamp(x, -8, 8) * 16), a 1/16 step


def save_mask(mask: dict[str, torch.Tensor], logits: dict[str, torch.Tensor], path):
    """The final mask as a safetensors file: the draw the model was made with, as
    ``bits.<tensor>`` (a binary draw, packed 8 a byte) or ``values.<tensor>`` (a relaxed
    draw, float32, exact), and ``logits.<tensor>`` (the learned logits, int8), with each
    tensor's shape and the draw's kind in the metadata. Written to a temp file, then renamed."""
    import json
    import os
    from pathlib import Path

    from safetensors.torch import save_file

    path = Path(path)
    tensors = {}
    binary = is_binary(mask)
    if binary:
        for n, b in pack_mask(mask).items():
            tensors[f"bits.{n}"] = b
    else:
        for n, m in mask.items():
            tensors[f"values.{n}"] = m.detach().to(torch.float32).cpu().contiguous()
    for n, x in logits.items():
        tensors[f"logits.{n}"] = (x.detach().float().cpu().clamp(-8, 8) * LOGIT_SCALE).round().to(torch.int8)
    meta = {"format": MASK_FORMAT, "logit_scale": str(LOGIT_SCALE), "draw": "bernoulli" if binary else "relaxed",
            "shapes": json.dumps({n: list(b.shape) for n, b in mask.items()})}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


def load_mask(path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(the mask draw, binary or relaxed; the logits) from a file written by ``save_mask``."""
    import json

    from zoo.checkpoints.reader import open_safetensors
    from zoo.errors import CheckpointError

    ck = open_safetensors(path)
    if ck.metadata.get("format") != MASK_FORMAT:
        raise CheckpointError(f"{path} is not a zoo mask file")
    shapes = {n: tuple(v) for n, v in json.loads(ck.metadata["shapes"]).items()}
    if all(f"values.{n}" in ck.tensors for n in shapes):
        mask = {n: ck.read_tensor(f"values.{n}").float().reshape(shapes[n]) for n in shapes}
    else:
        mask = unpack_mask({n: ck.read_tensor(f"bits.{n}") for n in shapes}, shapes)
    scale = float(ck.metadata.get("logit_scale", LOGIT_SCALE))
    logits = {n: ck.read_tensor(f"logits.{n}").float() / scale for n in shapes if f"logits.{n}" in ck.tensors}
    return mask, logits
