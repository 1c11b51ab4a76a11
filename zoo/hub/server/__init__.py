"""``zoo serve``: a Hugging Face Hub-compatible server backed by the registry."""
