"""Checkpoint files: the one reader, the one writer, task heads, compatibility checks,
task data and read-ahead. Nothing here knows the registry (no SQLAlchemy)."""
