"""MergeLock protection. Not built yet: see the open issue "protect/: MergeLock"."""
