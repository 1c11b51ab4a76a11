"""TSV-M: Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081)."""

from __future__ import annotations

import torch

from zoo.merge.learned.start import Start
from zoo.merge.methods.base import register
from zoo.merge.methods.params import Param, check_number
from zoo.merge.methods.spectral import EXCLUDE_PARAM, SpectralMerge, TaskMatrices, polar


@register
class TaskSingularVectors(SpectralMerge):
    """TSV-M: each expert's top 1/T singular triplets per matrix, factors orthogonalised across experts.

    Per 2-D weight: keep the top k = int(r / T) singular triplets of every task matrix
    (r = min(m, n)), concatenate them in task order, replace the stacked left and right
    factors by their nearest orthogonal matrices (orthogonal Procrustes), keep the
    singular values: theta = theta_0 + alpha * U_perp diag(s) V_perp^T.
    """

    name = "tsv"
    reference = ('Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", '
                 'CVPR 2025, arXiv 2412.00081')
    scale_name = "alpha"
    parameters = {
        "alpha": Param(1.0, check_number, "scale of the merged task vector (the paper sweeps 0.1-3.0 on validation)"),
        "exclude_keys": EXCLUDE_PARAM,
    }

    rebuildable = True

    def merge_matrix(self, tasks, options):
        return tsv_matrix(tasks)

    def as_start(self, source):
        """TSV-M's merge as coefficients over per-task directions, so a parity
        distillation can start from it: for a matrix, task t's direction is its own
        block of the merged matrix, U_perp[:, t] diag(s_t) V_perp[t]^T (the blocks sum
        to the merge), with coefficient alpha; for every other tensor, tau_t with alpha / T."""
        tvs = source.task_vectors
        t = len(tvs)
        directions: list[dict[str, torch.Tensor]] = [{} for _ in range(t)]
        weights: dict[str, list[float]] = {}
        for n in source.names:
            options = source.options[n]
            alpha = float(self.option(options, "alpha"))
            x = tvs[0][n]
            if self.is_matrix(n, tuple(x.shape), options):
                tasks = TaskMatrices(torch.zeros_like(x), [tv[n] for tv in tvs], torch.float32, deltas=True)
                for i, part in enumerate(tsv_components(tasks)):
                    directions[i][n] = part
                weights[n] = [alpha] * t
            else:
                for i in range(t):
                    directions[i][n] = tvs[i][n]
                weights[n] = [alpha / t] * t
        return Start(directions, weights)


def _factors(tasks: TaskMatrices) -> tuple[torch.Tensor, torch.Tensor, int]:
    """U_perp diag(s) and V_perp^T of TSV-M, and k, the singular triplets per task."""
    t = len(tasks)
    m, n = tasks.shape
    r = min(m, n)
    k = int(r * (1 / t))  # as the reference code computes it (sv_reduction = 1 / T)
    dtype, device = tasks.work, tasks.base.device
    u_cat = torch.zeros(m, r, dtype=dtype, device=device)
    s_cat = torch.zeros(r, dtype=dtype, device=device)
    vh_cat = torch.zeros(r, n, dtype=dtype, device=device)
    for i in range(t if k else 0):
        u, s, vh = torch.linalg.svd(tasks[i], full_matrices=False)
        u_cat[:, i * k:(i + 1) * k] = u[:, :k]
        s_cat[i * k:(i + 1) * k] = s[:k]
        vh_cat[i * k:(i + 1) * k] = vh[:k]
        del u, s, vh
    # one whole-size factor at a time: memory stays near one task matrix's SVD
    u_perp = polar(u_cat).mul_(s_cat)
    del u_cat
    return u_perp, polar(vh_cat), k


def tsv_matrix(tasks: TaskMatrices) -> torch.Tensor:
    """TSV-M's merged task matrix: the per-task low-rank blocks, whitened together.

    Slots past T * k (when T does not divide r) stay zero, and a zero singular value
    makes whatever direction the orthogonalisation gives its column irrelevant."""
    u_perp, vh_perp, _ = _factors(tasks)
    return u_perp @ vh_perp


def tsv_components(tasks: TaskMatrices) -> list[torch.Tensor]:
    """Each task's block of TSV-M's merged matrix, U_perp[:, block] diag(s) V_perp[block]^T;
    they sum to ``tsv_matrix`` (the slots past T * k hold zero singular values)."""
    u_perp, vh_perp, k = _factors(tasks)
    return [u_perp[:, i * k:(i + 1) * k] @ vh_perp[i * k:(i + 1) * k] for i in range(len(tasks))]
