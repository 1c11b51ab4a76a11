"""Moving models between the registry and a Hub, through ``huggingface_hub``.

``pull`` downloads a repository revision with ``snapshot_download`` (safetensors and
the small configuration and tokenizer files only, never pickles), checks every file
against the hash the Hub lists for it, and registers it with its repo id and commit
sha. ``push_folder`` uploads a folder in one commit on the branch's current head
(``parent_commit``), so a concurrent push makes one of the two fail instead of
silently overwriting it. What is pushed (and whether it must be protected first) is
decided a floor up, in ``zoo.publish``.

The endpoint is ``endpoint=``, else ``$HF_ENDPOINT``, else the Hugging Face Hub; the
token is ``token=``, else ``$HF_TOKEN`` or ``huggingface_hub``'s stored login. A token
is never printed, logged or stored.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import os
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

from zoo.checkpoints.reader import SIDECAR_SUFFIXES
from zoo.errors import HubError, PushConflict, ZooError
from zoo.fileio import datasync
from zoo.hub.git import DEFAULT_BRANCH, git_blob_oid
from zoo.hub.names import check_case_unique, path_problem, repo_id_problem
from zoo.progress import ProgressFactory
from zoo.registry import Registry
from zoo.registry.destination import Destination
from zoo.registry.records import NewModel
from zoo.registry.store import hash_file

# Top-level files a checkpoint is made of: its weights and the checkpoint reader's
# sidecars (a card other than README.md is the repository's own). Nothing else is
# pulled, and a push replaces only these.
MODEL_SUFFIXES = (".safetensors", *(s for s in SIDECAR_SUFFIXES if s != ".md"))
PULL_SUFFIXES = (*MODEL_SUFFIXES, "README.md")
PUSH_REPLACES = [f"*{s}" for s in MODEL_SUFFIXES]
TIMEOUT_ENV = "ZOO_HUB_TIMEOUT"
READ_BYTES = 1 << 20


def parse_repo(ref: str) -> tuple[str, str | None]:
    """``namespace/name[@revision]`` -> (repo id, revision or None)."""
    repo_id, _, rev = ref.partition("@")
    if (problem := repo_id_problem(repo_id)) is not None:
        raise ZooError(f"invalid repository id {ref!r}: {problem}; use namespace/name, optionally @revision")
    return repo_id, rev or None


def check_file_names(paths: list[str], what: str) -> None:
    """Refuse, before any file is written or sent, a path that some client disk cannot
    hold or that shows as another name (``zoo.hub.names``), and two that differ only in case."""
    for path in paths:
        if (problem := path_problem(path)) is not None:
            raise ZooError(f"{what}: the file {path[:80]!r} cannot be written safely on every disk: {problem}; "
                           "nothing was transferred")
    try:
        check_case_unique([], paths)
    except HubError as e:
        raise ZooError(f"{what}: {e}; nothing was transferred") from None


def endpoint_of(endpoint: str | None) -> str:
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def public_url(url: str) -> str:
    """An endpoint without any user:password part, fit to record and print."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))) \
        if parts.hostname else url


def _configure_client() -> None:
    """Give huggingface_hub's shared HTTP client timeouts, so an endpoint that accepts
    but never answers fails instead of hanging. (It sends ``timeout=None`` with most
    requests, so a client default would be overridden: a request hook fills them in.)"""
    from huggingface_hub.utils import _http

    if _http._GLOBAL_CLIENT_FACTORY is not _http.default_client_factory:
        return  # the user's own factory, or ours already

    def fill_timeouts(request) -> None:
        seconds = float(os.environ.get(TIMEOUT_ENV) or 60)
        given = request.extensions.get("timeout") or {}
        request.extensions["timeout"] = {
            k: given.get(k) if given.get(k) is not None else (min(seconds, 10.0) if k == "connect" else seconds)
            for k in ("connect", "read", "write", "pool")}

    def factory():
        client = _http.default_client_factory()
        client.event_hooks["request"].append(fill_timeouts)
        return client

    _http.set_client_factory(factory)
    # httpcore reads a response 64 KiB at a time; at GB sizes that per-read Python work,
    # not the network, bounds a download (a 2 GB pull from zoo serve: 9.8 s -> 6.8 s).
    from httpcore2._sync import http11

    if getattr(http11.HTTP11Connection, "READ_NUM_BYTES", 0) < READ_BYTES:
        http11.HTTP11Connection.READ_NUM_BYTES = READ_BYTES


def token_for(endpoint: str, token: str | None) -> str | bool | None:
    """The token to send. One given explicitly goes where it is told; otherwise
    huggingface_hub's own (``$HF_TOKEN``, else the stored login) is used, except that a
    Hugging Face token (``hf_...``) never travels over plain http, where anyone on the
    way could read it: a server on http gets no token unless it is its own."""
    if token is not None:
        return token
    from huggingface_hub import get_token

    implicit = get_token()
    if implicit and implicit.startswith("hf_") and urlsplit(endpoint).scheme != "https":
        return False
    return None


def _api(endpoint: str, token: str | bool | None):
    from huggingface_hub import HfApi

    _configure_client()
    return HfApi(endpoint=endpoint, token=token)


@contextlib.contextmanager
def hub_errors(endpoint: str, repo_id: str, revision: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one-line errors that say what to do."""
    import httpx2
    from huggingface_hub import errors

    where = public_url(endpoint)
    try:
        yield
    except errors.OfflineModeIsEnabled:
        raise ZooError("HF_HUB_OFFLINE is set: unset it to pull or push") from None
    except errors.RevisionNotFoundError:
        raise ZooError(f"revision {revision or DEFAULT_BRANCH!r} not found in {repo_id} on {where}") from None
    except errors.RepositoryNotFoundError:
        raise ZooError(f"{repo_id} not found on {where} (if it is private, set HF_TOKEN to a token "
                       "that can read it)") from None
    except errors.HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        said = (e.server_message or "").strip().splitlines()
        said = f": {said[0]}" if said else ""
        if status == 412 or (status == 409 and "commit" in said.lower()):
            raise PushConflict(f"{repo_id} moved on while pushing{said}; nothing of this push was committed; "
                               "pull or look at the new commit, then push again") from None
        if status == 401:
            raise ZooError(f"{where} refused the credentials{said}; set HF_TOKEN (or `hf auth login`) "
                           "to a token with write access") from None
        if status == 403:
            raise ZooError(f"{where} forbids this{said}; use a token with write access to {repo_id}") from None
        raise ZooError(f"{where} answered HTTP {status}{said}") from None
    except (httpx2.ConnectError, httpx2.ConnectTimeout) as e:
        raise ZooError(f"cannot reach {where}: {e or 'connection failed'}; check --endpoint / HF_ENDPOINT "
                       "and that the server is up") from None
    except httpx2.TimeoutException:
        raise ZooError(f"{where} did not answer in time; check the server, or raise ${TIMEOUT_ENV}") from None
    except httpx2.TransportError as e:
        raise ZooError(f"connection to {where} failed: {e}") from None
    except ValueError as e:  # a response huggingface_hub cannot use (e.g. card metadata refused)
        raise ZooError(f"{where}: {' '.join(str(e).split())}") from None
    except errors.LocalEntryNotFoundError as e:  # snapshot_download's word for a failed connection
        raise ZooError(f"cannot download {repo_id} from {where}: {str(e).splitlines()[0]}") from None


_xet_lock = threading.Lock()
_xet_users = [0, False]  # pushes in flight, and the setting they found


@contextlib.contextmanager
def _lfs_transfers() -> Iterator[None]:
    """Push through Git LFS, not Xet: one commit on its parent, and the only large-file
    protocol ``zoo serve`` speaks. (Xet uploads may split a folder into several commits.)
    huggingface_hub reads the switch from a module constant: concurrent pushes share it,
    and the last one to finish puts it back."""
    from huggingface_hub import constants

    with _xet_lock:
        if _xet_users[0] == 0:
            _xet_users[1] = constants.HF_HUB_DISABLE_XET
        _xet_users[0] += 1
        constants.HF_HUB_DISABLE_XET = True
    try:
        yield
    finally:
        with _xet_lock:
            _xet_users[0] -= 1
            if _xet_users[0] == 0:
                constants.HF_HUB_DISABLE_XET = _xet_users[1]


# -- pull ----------------------------------------------------------------------------------
def pull(
    registry: "Registry | Callable[[], Registry]",
    repo: str,
    *,
    name: str | None = None,
    kind: str | None = None,
    base: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    progress: ProgressFactory | None = None,
) -> dict[str, Any]:
    """Download ``repo`` (``namespace/name[@revision]``) and register it.

    Returns the registered model's summary with ``pulled`` False when that commit
    was already in the registry (nothing is downloaded then). ``registry`` may be a
    function that opens it: it is called once the Hub has answered, so a pull that
    cannot reach its Hub leaves no new registry behind.
    """
    from huggingface_hub import snapshot_download

    repo_id, revision = parse_repo(repo)
    url = endpoint_of(endpoint)
    token = token_for(url, token)
    api = _api(url, token)
    with hub_errors(url, repo_id, revision):
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    siblings = [s for s in info.siblings or [] if "/" not in s.rfilename and s.rfilename.endswith(PULL_SUFFIXES)]
    check_file_names([s.rfilename for s in siblings], f"{repo_id}@{info.sha[:12]}")  # before the registry opens
    registry = registry() if callable(registry) else registry
    sha = info.sha
    have = registry.find_hub(repo_id, sha)
    if have is not None:
        return {**registry.show(have), "pulled": False}
    if not any(s.rfilename.endswith(".safetensors") for s in siblings):
        others = sorted(s.rfilename for s in info.siblings or [])
        raise ZooError(f"{repo_id}@{sha[:12]} has no safetensors weights ({', '.join(others[:6]) or 'no files'}); "
                       "zoo never loads pickle checkpoints")
    kind = kind or _kind_from_card(info)
    name = name or repo_id.split("/")[-1]
    dest = Destination.check(name, None, registry, name_option="--name")
    with dest.workspace(".pull") as tmp:
        with hub_errors(url, repo_id, revision), _flushing(tmp):
            snapshot_download(repo_id, revision=sha, allow_patterns=[s.rfilename for s in siblings],
                              local_dir=tmp, endpoint=url, token=token)
        shutil.rmtree(tmp / ".cache", ignore_errors=True)
        with ThreadPoolExecutor(max(1, min(len(siblings), os.cpu_count() or 1))) as pool:  # hashlib frees the GIL
            digests = dict(zip([s.rfilename for s in siblings],
                               pool.map(lambda s: _verified(tmp / s.rfilename, s, repo_id), siblings)))
        meta = {"hub": {"endpoint": public_url(url), "repo": repo_id, "revision": sha,
                        "card": info.card_data.to_dict() if info.card_data else None}}
        added = dest.keep(NewModel(tmp, name, kind, digests, base=base, metadata=meta, hub_repo=repo_id,
                                   hub_revision=sha, check_base=base is not None), progress)
    return {**registry.show(added["ref"]), "pulled": True}


@contextlib.contextmanager
def _flushing(folder: Path, every: float = 0.2) -> Iterator[None]:
    """While the block runs, keep writing the files growing under ``folder`` to disk.

    The download is written by huggingface_hub; flushing it as it lands lets the disk
    work alongside the network instead of after it, and a pulled model is on disk
    (``_verified`` fsyncs each file) before the registry lists it.
    """
    done = threading.Event()

    def flush() -> None:
        while not done.wait(every):
            for p in [p for p in folder.rglob("*") if p.is_file()] if folder.is_dir() else []:
                try:
                    fd = os.open(p, os.O_RDONLY)
                except OSError:
                    continue  # renamed or removed meanwhile
                try:
                    datasync(fd)
                except OSError:
                    pass
                finally:
                    os.close(fd)

    t = threading.Thread(target=flush, daemon=True)
    t.start()
    try:
        yield
    finally:
        done.set()
        t.join()


def _kind_from_card(info) -> str:
    tags = set(info.tags or [])
    # getattr, not to_dict(): a card's metadata is whatever its author wrote, and
    # to_dict() fails on some (an `eval_results` key)
    relation = getattr(info.card_data, "base_model_relation", None) if info.card_data else None
    if "mergelock" in tags:
        return "protected"
    if "merge" in tags or relation == "merge":
        return "merged"
    return "base"


def _verified(path: Path, sibling, repo_id: str) -> str:
    """The file's sha256, after checking it against the hash the Hub lists for it."""
    if not path.is_file():
        raise ZooError(f"{repo_id}: {sibling.rfilename} was not downloaded")
    if sibling.lfs is not None:
        digest, size = hash_file(path)
        ok = digest == sibling.lfs.sha256 and size == sibling.lfs.size
    else:
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        ok = sibling.blob_id is None or git_blob_oid(data) == sibling.blob_id
    if not ok:
        raise ZooError(f"{repo_id}: {sibling.rfilename} does not match the hash the Hub lists for it; "
                       "nothing was registered")
    fd = os.open(path, os.O_RDONLY)
    try:
        datasync(fd)
    finally:
        os.close(fd)
    return digest


# -- push ----------------------------------------------------------------------------------
def check_push(repo_id: str, *, endpoint: str | None = None, token: str | None = None) -> dict[str, Any]:
    """Refuse, before anything is made for it, a push that the token could not make.

    Asks the Hub who the token is (``whoami``): a missing or refused token, a read-only
    one, or a repository outside the user's namespaces and organisations is refused
    with one line. Returns the user, its organisations and the token's role.
    """
    from huggingface_hub.errors import LocalTokenNotFoundError

    repo_id, _ = parse_repo(repo_id)
    url = endpoint_of(endpoint)
    tok = token_for(url, token)
    api = _api(url, tok)
    with hub_errors(url, repo_id):
        try:
            if tok is False:
                raise LocalTokenNotFoundError("no token")
            who = api.whoami()
        except LocalTokenNotFoundError:
            api.repo_exists(repo_id)  # an unreachable Hub says so first
            raise ZooError(f"pushing to {public_url(url)} needs a token with write access: set HF_TOKEN "
                           "(or `hf auth login`)") from None
        except ValueError as e:  # the client's word for a 401 on whoami
            raise ZooError(f"{public_url(url)} refused the credentials ({' '.join(str(e).split())[:120]}); set "
                           "HF_TOKEN (or `hf auth login`) to a token with write access") from None
    user = str(who.get("name") or "")
    orgs = [str(o.get("name")) for o in who.get("orgs") or [] if isinstance(o, dict)]
    role = str(((who.get("auth") or {}).get("accessToken") or {}).get("role") or "")
    if role == "read":
        raise ZooError(f"the token of {user} on {public_url(url)} is read-only; pushing needs a write token")
    namespace = repo_id.split("/", 1)[0] if "/" in repo_id else user
    if namespace.lower() not in {n.lower() for n in (user, *orgs)}:
        raise ZooError(f"{user} may not push to {repo_id} on {public_url(url)}: {namespace} is neither {user}'s "
                       f"namespace nor one of its organisations' ({', '.join(orgs) or 'none'}); push to "
                       f"{user}/{repo_id.split('/')[-1]} or ask to join {namespace}")
    return {"user": user, "orgs": orgs, "role": role}


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    branch: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    message: str = "Upload with zoo",
    description: str | None = None,
    digests: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Upload ``folder`` as one commit on ``branch`` (default ``main``) of ``repo_id``.

    The repository is created if missing. The commit names the branch's current head
    as its parent, so a push that raced another one fails with ``PushConflict``. The
    model files of the parent commit that this folder does not have are deleted in
    the same commit, so a repository never mixes two models' shards.

    This is ``upload_folder``'s commit, built here so that ``digests`` (the sha256 of
    files the registry has already hashed) spare the client a second read of every
    large file; the server checks each upload against its sha256 anyway.
    """
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import RepositoryNotFoundError
    from huggingface_hub.hf_api import RepoFile

    repo_id, _ = parse_repo(repo_id)
    url = endpoint_of(endpoint)
    api = _api(url, token_for(url, token))
    folder = Path(folder)
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
    adds = []
    for p in files:
        rel = p.relative_to(folder).as_posix()
        op = CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(p))
        if digests and rel in digests:
            op.upload_info.sha256 = bytes.fromhex(digests[rel])
        adds.append(op)
    check_file_names([op.path_in_repo for op in adds], f"cannot push {folder} to {repo_id}")
    with hub_errors(url, repo_id, branch), _lfs_transfers():
        try:
            parent = api.model_info(repo_id, revision=branch).sha
        except RepositoryNotFoundError:  # (an existing repository keeps its visibility)
            api.create_repo(repo_id, private=private, exist_ok=True)
            parent = api.model_info(repo_id, revision=branch).sha
        remote = {f.path: f for f in api.list_repo_tree(repo_id, revision=parent, recursive=True)
                  if isinstance(f, RepoFile)}
        ours = {op.path_in_repo for op in adds}
        stale = [CommitOperationDelete(path_in_repo=f) for f in remote  # top-level model files only
                 if f not in ours and "/" not in f and any(fnmatch.fnmatch(f, pat) for pat in PUSH_REPLACES)]
        same = not stale and all(_same(folder / op.path_in_repo, remote.get(op.path_in_repo), digests) for op in adds)
        info = None if same else api.create_commit(repo_id, operations=[*stale, *adds], commit_message=message,
                                                   commit_description=description, revision=branch,
                                                   parent_commit=parent)
    commit = info.oid if info is not None else parent  # nothing to commit: the branch already holds it
    return {"repo_id": repo_id, "endpoint": public_url(url), "branch": branch or DEFAULT_BRANCH,
            "parent": parent, "commit": commit, "unchanged": info is None,
            "url": f"{public_url(url)}/{repo_id}/commit/{commit}", "files": len(files),
            "bytes": sum(p.stat().st_size for p in files)}


def _same(path: Path, remote, digests: dict[str, str] | None) -> bool:
    """Whether the branch already holds exactly this file at this path."""
    if remote is None or remote.size != path.stat().st_size:
        return False
    if remote.lfs is not None:
        return ((digests or {}).get(remote.path) or hash_file(path)[0]) == remote.lfs.sha256
    return git_blob_oid(path.read_bytes()) == remote.blob_id
