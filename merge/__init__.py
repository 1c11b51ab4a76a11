"""The merge engine. Not built yet: see the open issue "The merge engine"."""
