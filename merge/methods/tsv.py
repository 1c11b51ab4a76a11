"""TSV-M: Task Singular Vectors merging (Gargiulo et al., CVPR 2025, arXiv 2412.00081)."""

from __future__ import annotations

import torch

from zoo.merge.methods.base import register
from zoo.merge.methods.params import Param, check_number
from zoo.merge.methods.spectral import EXCLUDE_PARAM, SpectralMerge, polar


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

    def merge_matrix(self, deltas, options):
        return tsv_matrix(deltas)


def tsv_matrix(deltas: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M's merged task matrix: the per-task low-rank blocks, whitened together.

    Slots past T * k (when T does not divide r) stay zero, and a zero singular value
    makes whatever direction the orthogonalisation gives its column irrelevant."""
    t = len(deltas)
    m, n = deltas[0].shape
    r = min(m, n)
    k = int(r * (1 / t))  # as the reference code computes it (sv_reduction = 1 / T)
    u_cat = deltas[0].new_zeros(m, r)
    s_cat = deltas[0].new_zeros(r)
    vh_cat = deltas[0].new_zeros(r, n)
    for i, d in enumerate(deltas):
        if k == 0:
            break
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        u_cat[:, i * k:(i + 1) * k] = u[:, :k]
        s_cat[i * k:(i + 1) * k] = s[:k]
        vh_cat[i * k:(i + 1) * k] = vh[:k]
        del u, s, vh
    return (polar(u_cat) * s_cat) @ polar(vh_cat)
