"""Versioned schema migrations (Alembic). Never edit tables by hand: add a revision."""

# The latest revision in versions/; a test checks that Alembic agrees.
SCHEMA_HEAD = "0006"
