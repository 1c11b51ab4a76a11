"""``zoo serve``: a Hugging Face Hub-compatible HTTP server over a registry.

It speaks the subset of the Hub's API that ``huggingface_hub`` (and so
``transformers``) uses to create a repository, upload a folder in one commit, list
and download files: repo create, model info, tree, preupload, the NDJSON commit,
the Git LFS batch API with a basic PUT upload, ``resolve`` with ETag and Range, and
validate-yaml. Small files travel inline in the commit; large ones are PUT to a
signed, short-lived URL and stream straight into the blob store, hashed as they
arrive. Xet is not spoken: clients must set ``HF_HUB_DISABLE_XET=1`` (zoo's own
pull and push do).

``app`` answers the requests, ``wire`` reads and writes the Hub's wire format,
``uploads`` receives LFS uploads, ``cards`` checks and serves model cards, ``startup`` binds
the socket and runs uvicorn.
"""

from zoo.hub.server.app import ServeSettings
from zoo.hub.server.startup import running, serve

__all__ = ["ServeSettings", "running", "serve"]
