"""The Hub: Git and LFS facts, the client (pull and push), tokens, and ``zoo serve``."""
