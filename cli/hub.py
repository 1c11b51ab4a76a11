"""Hub commands: pull from and push to a Hugging Face Hub, serve the registry as one, and
the tokens that may write to it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from zoo.cli import render
from zoo.cli.options import EndpointOpt, JsonOpt, RegistryOpt, Typer, open_registry, registry_file

app = Typer()
token_app = Typer(no_args_is_help=True, help="Tokens for `zoo serve`.")


@app.command()
def pull(
    repo: str = typer.Argument(..., metavar="REPO",
                               help="namespace/name, optionally @revision (branch or commit sha)."),
    name: Optional[str] = typer.Option(None, "--name", "-n", metavar="NAME",
                                       help="Registry name (default: the repo's name)."),
    kind: Optional[str] = typer.Option(None, "--kind", "-k", metavar="KIND",
                                       help="base | expert | adapter | merged | protected (default: from the model "
                                            "card's tags)."),
    base: Optional[str] = typer.Option(None, "--base", "-b", metavar="MODEL",
                                       help="The base model (registry name), for an expert."),
    endpoint: Optional[str] = EndpointOpt,
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Download a model from a Hub (safetensors only), verify it and register it."""
    from zoo.hub.client import pull as pull_api

    with render.progress_bars() as progress:
        info = pull_api(lambda: open_registry(create=True), repo, name=name, kind=kind, base=base,
                        endpoint=endpoint, progress=progress)
    if as_json:
        render.emit_json(info)
        return
    src = info["source"]
    if info["pulled"]:
        print(f"pulled {src['hub_repo']}@{src['hub_revision'][:12]} into {info['ref']} ({info['kind']}, "
              f"{len(info['files'])} files, {render.human_bytes(info['tensors']['bytes'])}; every file checked "
              "against the Hub's hashes)")
    else:
        print(f"{info['ref']} already is {src['hub_repo']}@{src['hub_revision'][:12]}; nothing to do")


@app.command()
def push(
    name: str = typer.Argument(..., metavar="MODEL", help="The registered model to publish."),
    repo: str = typer.Argument(..., metavar="REPO", help="namespace/name of the Hub repository (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private (an existing one keeps its "
                                                        "visibility)."),
    revision: Optional[str] = typer.Option(None, "--revision", metavar="BRANCH",
                                           help="Branch to commit to (default: main)."),
    no_protect: bool = typer.Option(False, "--no-protect", help="Push an expert's or a merge's weights "
                                                                "unprotected (by default they are MergeLock-"
                                                                "protected first)."),
    endpoint: Optional[str] = EndpointOpt,
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Publish a model to a Hub in one commit, MergeLock-protected unless --no-protect."""
    from zoo.publish import publish

    with render.progress_bars() as progress:
        info = publish(open_registry(), name, repo, protect_weights=not no_protect, private=private,
                       branch=revision, endpoint=endpoint, progress=progress)
    if as_json:
        render.emit_json(info)
        return
    if info["protected_now"]:
        print(f"protected {info['source']} as {info['pushed']} (its key stays in this registry)")
    what = "protected" if info["kind"] == "protected" else "unprotected"
    if info["unchanged"]:
        print(f"{info['repo_id']}@{info['branch']} already holds {info['pushed']} ({what}) at commit "
              f"{info['commit'][:12]}; nothing to push")
        return
    print(f"pushed {info['pushed']} ({what}, {info['files']} files, {render.human_bytes(info['bytes'])}) to "
          f"{info['repo_id']}@{info['branch']}: commit {info['commit'][:12]} on {info['parent'][:12]}")
    print(info["url"])


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", metavar="ADDRESS",
                             help="Address to listen on (default: loopback only)."),
    port: int = typer.Option(8000, "--port", "-p", metavar="PORT", help="Port (0: any free one)."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", metavar="PATH",
                                              help="Tokens that may write (default: registry.tokens beside the "
                                                   "registry)."),
    private_reads: bool = typer.Option(False, "--private-reads", help="Reads need a token too (default: open)."),
    lfs_threshold: int = typer.Option(10 * 1024 * 1024, "--lfs-threshold", metavar="BYTES",
                                      help="Files this big or bigger upload through LFS, not inline."),
    quiet: bool = typer.Option(False, "--quiet", help="No access log."),
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Serve the registry as a Hugging Face Hub-compatible endpoint (HF_ENDPOINT=URL)."""
    from zoo.hub.server import ServeSettings, serve as serve_api
    from zoo.hub.tokens import TokenSet, default_token_file

    path = registry_file()
    tokens = TokenSet.load(token_file or default_token_file(path), missing_ok=token_file is None)
    settings = ServeSettings(tokens, open_reads=not private_reads, lfs_threshold=lfs_threshold)

    def ready(url: str) -> None:
        writers = f"{len(tokens)} token(s)" if len(tokens) else "no tokens yet: read-only until `zoo token create`"
        print(f"serving {path} at {url} ({writers}; reads {'need a token' if private_reads else 'open'}). "
              f"Clients: HF_ENDPOINT={url} HF_HUB_DISABLE_XET=1", flush=True)

    serve_api(lambda: open_registry(create=True), settings, host=host, port=port, on_ready=ready,
              access_log=not quiet)


@token_app.command("create")
def token_create(
    name: str = typer.Option(..., "--name", "-n", metavar="NAME", help="Who or what holds the token."),
    scope: str = typer.Option("write", "--scope", metavar="SCOPE", help="write (push and pull) or read."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", metavar="PATH",
                                              help="Token file (default: registry.tokens beside the registry)."),
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Create a token for `zoo serve`; it is shown once, and only its hash is kept."""
    from zoo.hub.tokens import create_token, default_token_file

    file = token_file or default_token_file(registry_file())
    token = create_token(file, name, scope)
    if as_json:
        render.emit_json({"name": name, "scope": scope, "token": token, "token_file": str(file)})
        return
    print(token)
    print(f"({scope} token {name!r} added to {file}; it is not shown again. Clients: HF_TOKEN=<token>)",
          file=sys.stderr)
