"""Learned merges: coefficients and Concrete masks fitted by running the model on
unlabeled (or, supervised, labelled) data. See ``train`` for the loops and ``run`` for
the pipeline from registry or paths to a registered model."""
