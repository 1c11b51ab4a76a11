"""Hub commands: pull from and push to a Hugging Face Hub, serve the registry as one, and
the users, organisations and tokens of that server."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from zoo.cli import render
from zoo.cli.options import EndpointOpt, JsonOpt, KeySeedOpt, MaxCondOpt, RegistryOpt, Typer, open_registry, \
    registry_location

app = Typer()
token_app = Typer(no_args_is_help=True, help="Tokens of `zoo serve`'s users.")
user_app = Typer(no_args_is_help=True, help="Users of `zoo serve`.")
org_app = Typer(no_args_is_help=True, help="Organisations of `zoo serve`: namespaces their members write to.")


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
    seed: Optional[int] = KeySeedOpt,
    max_cond: Optional[float] = MaxCondOpt,
    endpoint: Optional[str] = EndpointOpt,
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Publish a model to a Hub in one commit, MergeLock-protected unless --no-protect.

    --seed and --max-cond set the key of a protection made now; a protected copy of
    this version made before is reused as it is.
    """
    from zoo.publish import publish

    with render.progress_bars() as progress:
        info = publish(open_registry(), name, repo, protect_weights=not no_protect, private=private,
                       branch=revision, endpoint=endpoint, protect_seed=seed, protect_max_cond=max_cond,
                       progress=progress)
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
    private_reads: bool = typer.Option(False, "--private-reads", help="Reads need a token too (default: open)."),
    lfs_threshold: int = typer.Option(10 * 1024 * 1024, "--lfs-threshold", metavar="BYTES",
                                      help="Files this big or bigger upload through LFS, not inline."),
    quiet: bool = typer.Option(False, "--quiet", help="No access log."),
    workers: int = typer.Option(1, "--workers", "-w", metavar="N",
                                help="Processes serving the one port (more than 1: a registry on PostgreSQL)."),
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Serve the registry as a Hugging Face Hub-compatible endpoint (HF_ENDPOINT=URL).

    Users, organisations and tokens are managed on this machine with `zoo user`, `zoo org`
    and `zoo token`. On the first run, a user (your login name) and its write token are
    made, and the token is printed once."""
    from zoo.hub.server import ServeSettings, serve as serve_api
    from zoo.hub.server.startup import check_workers, open_accounts

    where = registry_location()
    check_workers(workers, where.on_server)  # before anything is bound or made
    path = where.file if where.file is not None else where.store / "registry.db"  # beside it: an old token file
    settings = ServeSettings(open_reads=not private_reads, lfs_threshold=lfs_threshold)
    said: list[str] = []

    def opened():
        reg = open_registry(create=True)
        said.extend(open_accounts(reg, path))
        return reg

    def ready(url: str) -> None:
        many = f", {workers} workers" if workers > 1 else ""
        print(f"serving {where.shown} at {url} (reads {'need a token' if private_reads else 'open'}{many}). "
              f"Clients: HF_ENDPOINT={url} HF_HUB_DISABLE_XET=1 HF_TOKEN=<token>; pages: {url}/ui", flush=True)
        for line in said:
            print(line, flush=True)

    serve_api(opened, settings, host=host, port=port, on_ready=ready, access_log=not quiet, workers=workers)


@token_app.command("create")
def token_create(
    user: str = typer.Option(..., "--user", "-u", metavar="USER",
                             help="The user who holds the token (added if new)."),
    scope: str = typer.Option("write", "--scope", metavar="SCOPE",
                              help="write (read, and write to the user's namespaces) or read."),
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Create a token for `zoo serve`; it is shown once, and only its hash is kept."""
    from zoo.hub.accounts import Accounts

    out = Accounts(open_registry(create=True)).create_token(user, scope)
    if as_json:
        render.emit_json(out)
        return
    print(out["token"])
    added = f"added user {out['user']!r} and " if out["user_created"] else ""
    print(f"({added}created {scope} token {out['id']} of {out['user']}; it is not shown again. "
          "Clients: HF_TOKEN=<token>)", file=sys.stderr)


@token_app.command("list")
def token_list(
    user: Optional[str] = typer.Option(None, "--user", "-u", metavar="USER", help="Only this user's tokens."),
    revoked: bool = typer.Option(False, "--revoked", help="Include revoked tokens."),
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """List the server's tokens (ids, users, scopes; never the tokens themselves)."""
    from zoo.hub.accounts import Accounts

    rows = Accounts(open_registry()).tokens(user, revoked=revoked)
    if as_json:
        render.emit_json(rows)
        return
    if not rows:
        print("no tokens; create one with `zoo token create --user NAME`", file=sys.stderr)
    render.table(rows, [("id", "ID"), ("user", "USER"), ("scope", "SCOPE"), ("created_at", "CREATED")]
                 + ([("revoked_at", "REVOKED")] if revoked else []))


@token_app.command("revoke")
def token_revoke(
    token_id: str = typer.Argument(..., metavar="ID", help="The token's id, from `zoo token list`."),
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Revoke a token: a running server refuses it from its next request."""
    from zoo.hub.accounts import Accounts

    out = Accounts(open_registry()).revoke(token_id)
    if as_json:
        render.emit_json(out)
        return
    print(f"revoked {out['scope']} token {out['id']} of {out['user']}")


@user_app.command("add")
def user_add(
    name: str = typer.Argument(..., metavar="NAME", help="The user's name: its namespace for repositories."),
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Add a user of `zoo serve` (`zoo token create --user NAME` gives it a token)."""
    from zoo.hub.accounts import Accounts

    created = Accounts(open_registry(create=True)).add_user(name)
    if as_json:
        render.emit_json({"name": name, "kind": "user", "created": created})
        return
    print(f"added user {name}" if created else f"user {name} already exists; nothing to do")


@user_app.command("list")
def user_list(
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """List the server's users and organisations, with members and live tokens."""
    from zoo.hub.accounts import Accounts

    rows = Accounts(open_registry()).accounts()
    if as_json:
        render.emit_json(rows)
        return
    if not rows:
        print("no users yet; add one with `zoo user add NAME` or `zoo token create --user NAME`", file=sys.stderr)
    render.table([{**r, "with": r.get("members", r.get("orgs"))} for r in rows],
                 [("name", "NAME"), ("kind", "KIND"), ("with", "MEMBERS / ORGS"), ("tokens", "TOKENS")])


@org_app.command("add")
def org_add(
    name: str = typer.Argument(..., metavar="ORG", help="The organisation's name: a namespace for repositories."),
    members: list[str] = typer.Option([], "--member", "-m", metavar="USER", help="A member (repeat for more)."),
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Add an organisation, optionally with members; its members may write to its namespace."""
    from zoo.hub.accounts import Accounts

    created = Accounts(open_registry(create=True)).add_org(name, members)
    if as_json:
        render.emit_json({"name": name, "kind": "org", "created": created, "members": members})
        return
    print((f"added organisation {name}" if created else f"organisation {name} exists")
          + (f"; members: {', '.join(members)}" if members else ""))


@org_app.command("add-member")
def org_add_member(
    org: str = typer.Argument(..., metavar="ORG"),
    user: str = typer.Argument(..., metavar="USER"),
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Make a user a member of an organisation."""
    from zoo.hub.accounts import Accounts

    added = Accounts(open_registry()).add_member(org, user)
    if as_json:
        render.emit_json({"org": org, "user": user, "added": added})
        return
    print(f"{user} is now a member of {org}" if added else f"{user} already is a member of {org}; nothing to do")


@org_app.command("remove-member")
def org_remove_member(
    org: str = typer.Argument(..., metavar="ORG"),
    user: str = typer.Argument(..., metavar="USER"),
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Remove a user from an organisation: its tokens lose that namespace at once."""
    from zoo.hub.accounts import Accounts

    Accounts(open_registry()).remove_member(org, user)
    if as_json:
        render.emit_json({"org": org, "user": user, "removed": True})
        return
    print(f"{user} is no longer a member of {org}")
