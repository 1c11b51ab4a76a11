"""Answers for the requests ``zoo serve`` does not serve, worded so the client shows them.

- ``huggingface_hub`` shows the server's ``X-Error-Message`` for a ``RepoNotFound``
  error, but turns most other failures of a download's first request into "check your
  connection". Dataset and Space routes therefore answer 404 ``RepoNotFound``, with
  the reason in the message.
- git prints a ``text/plain`` error body line by line as ``remote: ...``, so its
  smart-HTTP routes get one in plain words.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from zoo.errors import RepoNotFound

REPO_KINDS = ("datasets", "spaces")
GIT_SERVICES = ("git-upload-pack", "git-receive-pack")


def is_other_kind(parts: list[str]) -> bool:
    """A dataset or Space route: ``/api/datasets/...``, ``/datasets/{repo}/resolve/...``.

    The Hub reserves these two namespaces, so ``/datasets/x/...`` is never a model.
    """
    return parts[:1] == ["api"] and parts[1:2] in (["datasets"], ["spaces"]) or parts[:1] in (["datasets"],
                                                                                            ["spaces"])


def other_kind(parts: list[str]) -> RepoNotFound:
    kind = parts[1] if parts[0] == "api" else parts[0]
    return RepoNotFound(f"zoo serve holds model repositories only: no {kind}. Use repo_type='model' "
                        "(the default), or the Hugging Face Hub for datasets and Spaces")


def is_git(request: Request, parts: list[str]) -> bool:
    """Git's smart and dumb HTTP routes: ``/{repo}[.git]/info/refs``, ``/{repo}[.git]/git-upload-pack``."""
    return len(parts) >= 2 and (parts[-2:] == ["info", "refs"] or parts[-1] in GIT_SERVICES
                                or request.query_params.get("service") in GIT_SERVICES)


def not_git(request: Request, parts: list[str]) -> Response:
    end = -2 if parts[-2:] == ["info", "refs"] else -1
    repo_id = "/".join(parts[:end])
    repo_id = repo_id[: -len(".git")] if repo_id.endswith(".git") else repo_id
    host = str(request.base_url).rstrip("/")
    text = (f"zoo serve does not speak git: it serves the Hugging Face Hub's HTTP API only.\n"
            f"To download {repo_id}: HF_ENDPOINT={host} hf download {repo_id}\n"
            f"or, into a zoo registry: zoo pull {repo_id} --endpoint {host}\n"
            f"To upload: HF_HUB_DISABLE_XET=1 hf upload {repo_id} FOLDER, or zoo push.\n")
    return PlainTextResponse(text, status_code=501, headers={"X-Error-Code": "NotImplemented",
                                                             "X-Error-Message": "zoo serve does not speak git"})
