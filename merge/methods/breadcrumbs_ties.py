"""Model Breadcrumbs with TIES: Breadcrumbs' outlier trim, then TIES' sign election and
disjoint merge (mergekit's ``breadcrumbs_ties``)."""

from __future__ import annotations

from zoo.merge.methods.base import register
from zoo.merge.methods.breadcrumbs import Breadcrumbs


@register
class BreadcrumbsTies(Breadcrumbs):
    """Model Breadcrumbs' trim (drop the largest ``gamma`` and the smallest), then TIES' sign election.

    Defaults are mergekit 0.1.5's: normalize false, rescale false.
    """

    name = "breadcrumbs_ties"
    consensus = True
