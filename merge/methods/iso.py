"""Isotropic merging, Iso-C and Iso-CTS (Marczak et al., "No Task Left Behind: Isotropic
Model Merging with Common and Task-Specific Subspaces", ICML 2025, arXiv 2502.04959)."""

from __future__ import annotations

import torch

from zoo.merge.methods.base import register
from zoo.merge.methods.params import Param, check_number, check_unit
from zoo.merge.methods.spectral import EXCLUDE_PARAM, SpectralMerge, TaskMatrices, polar

REFERENCE = ('Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific '
             'Subspaces", ICML 2025, arXiv 2502.04959')
SCALE_DOC = "scale of the merged task vector (FusionBench runs 1.5 on CLIP; the paper sweeps 0.1-3.0 on validation)"


@register
class IsoC(SpectralMerge):
    """Iso-C: the sum of the task matrices with its singular spectrum flattened to its mean.

    Per 2-D weight: Delta = sum_i tau_i = U S V^T; theta = theta_0 + scaling_factor *
    mean(S) * U V^T.
    """

    name = "iso_c"
    reference = REFERENCE
    scale_name = "scaling_factor"
    parameters = {"scaling_factor": Param(1.0, check_number, SCALE_DOC), "exclude_keys": EXCLUDE_PARAM}

    def merge_matrix(self, tasks, options):
        return iso_c_matrix(tasks)


@register
class IsoCTS(SpectralMerge):
    """Iso-CTS: the sum's top directions as a common subspace plus each task's own directions, flattened.

    Per 2-D weight: the top k_c = r - T * k_t singular directions of sum_i tau_i (k_c
    about common_space_fraction * r), then for each task the top k_t directions of tau_i
    with the common left subspace projected out; the stacked factors are orthogonalised
    (Procrustes) and every singular value set to the mean of them all.
    """

    name = "iso_cts"
    reference = REFERENCE
    scale_name = "scaling_factor"
    parameters = {"scaling_factor": Param(1.0, check_number, SCALE_DOC),
                  "common_space_fraction": Param(0.8, check_unit, "fraction of the rank given to the common "
                                                                  "subspace; the rest is split evenly between tasks"),
                  "exclude_keys": EXCLUDE_PARAM}

    def merge_matrix(self, tasks, options):
        return iso_cts_matrix(tasks, float(self.option(options, "common_space_fraction")))


def iso_c_matrix(tasks: TaskMatrices) -> torch.Tensor:
    """Iso-C's merged task matrix: mean(S) U V^T of the sum of the task matrices."""
    u, s, vh = torch.linalg.svd(tasks.total(), full_matrices=False)
    return u.mul_(s.mean()) @ vh


def subspace_sizes(r: int, t: int, fraction: float) -> tuple[int, int]:
    """(k_c, k_t): the common rank and each task's rank, as the reference code rounds
    them (T * k_t = r - k_c); a task share rounded past r is rounded down instead."""
    k_c = int(r * fraction)
    ts_total = round((r - k_c) / t) * t
    if ts_total > r:  # the reference code would index out of range here
        ts_total = (r // t) * t
    k_c = r - ts_total
    return k_c, ts_total // t


def iso_cts_matrix(tasks: TaskMatrices, fraction: float) -> torch.Tensor:
    """Iso-CTS's merged task matrix: task blocks in slots [i k_t, (i+1) k_t), then the common block."""
    t = len(tasks)
    m, n = tasks.shape
    r = min(m, n)
    k_c, k_t = subspace_sizes(r, t, fraction)
    u, s, vh = torch.linalg.svd(tasks.total(), full_matrices=False)
    u_c = u[:, :k_c]
    u_all = torch.zeros_like(u)
    s_all = torch.zeros_like(s)
    vh_all = torch.zeros_like(vh)
    u_all[:, t * k_t:] = u_c
    s_all[t * k_t:] = s[:k_c]
    vh_all[t * k_t:] = vh[:k_c]
    del s, vh
    for i in range(t if k_t else 0):
        d = tasks[i]
        # only the left (column-space) projection, as the reference code does
        residual = d - u_c @ (u_c.T @ d)
        ut, st, vht = torch.linalg.svd(residual, full_matrices=False)
        del residual
        u_all[:, i * k_t:(i + 1) * k_t] = ut[:, :k_t]
        s_all[i * k_t:(i + 1) * k_t] = st[:k_t]
        vh_all[i * k_t:(i + 1) * k_t] = vht[:k_t]
        del ut, st, vht
    del u, u_c
    u_perp = polar(u_all).mul_(s_all.mean())
    del u_all
    return u_perp @ polar(vh_all)
