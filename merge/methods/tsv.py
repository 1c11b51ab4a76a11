"""TSV-M: Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081)."""

from __future__ import annotations

import torch

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

    def merge_matrix(self, tasks, options):
        return tsv_matrix(tasks)


def tsv_matrix(tasks: TaskMatrices) -> torch.Tensor:
    """TSV-M's merged task matrix: the per-task low-rank blocks, whitened together.

    Slots past T * k (when T does not divide r) stay zero, and a zero singular value
    makes whatever direction the orthogonalisation gives its column irrelevant."""
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
    return u_perp @ polar(vh_cat)
