"""The Hub: Git and LFS facts, allowed names, the client (pull and push), tokens, and ``zoo serve``."""
