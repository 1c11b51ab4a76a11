"""The ``zoo`` command: a thin typer layer over the Python API in ``zoo/``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from zoo.errors import ZooError

from zoo.cli import output

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="zoo: a registry for base models, experts, adapters, merges and protected models.")


class State:
    registry: Optional[Path] = None


@app.callback()
def _root(registry: Optional[Path] = typer.Option(
        None, "--registry", envvar="ZOO_REGISTRY", help="Registry database (default: ./registry.db).")) -> None:
    State.registry = registry


def _open(create: bool = False):
    from zoo.registry import Registry

    return Registry(State.registry, create=create)


JsonOpt = typer.Option(False, "--json", help="Print JSON instead of a table.")


@app.command()
def init() -> None:
    """Create an empty registry (and its blob store) in the working directory."""
    r = _open(create=True)
    r.store.ensure()
    print(f"registry: {r.path}\nstore:    {r.store.root}")


@app.command()
def add(
    path: Path = typer.Argument(..., help="A model folder, PEFT adapter folder or .safetensors file."),
    name: str = typer.Option(..., "--name", "-n", help="Registry name: letters, digits, '.', '-', '_'."),
    kind: str = typer.Option("expert", "--kind", "-k", help="base | expert | adapter | merged | protected"),
    base: Optional[str] = typer.Option(None, "--base", "-b", help="The base model (registry name)."),
    task: list[str] = typer.Option([], "--task", "-t", help="A task this model is for (repeatable)."),
    tag: list[str] = typer.Option([], "--tag", help="A tag (repeatable)."),
    in_place: bool = typer.Option(False, "--in-place", help="Register the files where they are; do not copy."),
    new_version: bool = typer.Option(False, "--new-version", help="Add a new version of an existing name."),
    as_json: bool = JsonOpt,
) -> None:
    """Register a checkpoint, copying its files into the content-addressed store."""
    r = _open(create=True)
    with output.progress_bars() as progress:
        info = r.add(path, name, kind, base=base, tasks=task, tags=tag, in_place=in_place,
                     new_version=new_version, progress=progress)
    if as_json:
        output.emit_json(info)
    else:
        print(f"added {info['ref']} ({info['kind']}, {info['parameters']:,} parameters, "
              f"{output.human_bytes(info['bytes'])})")


@app.command("list")
def list_(
    kind: Optional[str] = typer.Option(None, "--kind", "-k"),
    base: Optional[str] = typer.Option(None, "--base", "-b"),
    task: Optional[str] = typer.Option(None, "--task", "-t"),
    tag: Optional[str] = typer.Option(None, "--tag"),
    as_json: bool = JsonOpt,
) -> None:
    """List registered models."""
    from zoo.registry.listing import list_models
    from zoo.registry.paths import existing_registry

    rows = list_models(existing_registry(State.registry), kind=kind, base=base, task=task, tag=tag)
    if as_json:
        output.emit_json(rows)
        return
    if not rows:
        print("no models; add one with `zoo add PATH --name NAME --kind base`")
        return
    for row in rows:
        row["size"] = output.human_bytes(row["bytes"])
    output.table(rows, [("ref", "MODEL"), ("kind", "KIND"), ("base", "BASE"), ("model_type", "TYPE"),
                        ("parameters", "PARAMS"), ("size", "SIZE"), ("tasks", "TASKS"), ("tags", "TAGS")])


@app.command()
def show(name: str, as_json: bool = JsonOpt) -> None:
    """Everything the registry knows about one model."""
    info = _open().show(name)
    if as_json:
        output.emit_json(info)
        return
    arch = info["architecture"]
    t = info["tensors"]
    print(f"{info['ref']}  ({info['kind']}, {info['form']})")
    print(f"  base:         {info['base'] or '-'}")
    print(f"  architecture: {arch.get('model_type', '-')}  hidden {arch.get('hidden_size', '-')}  "
          f"layers {arch.get('num_layers', '-')}  heads {arch.get('num_heads', '-')}  "
          f"kv heads {arch.get('num_kv_heads', '-')}  vocab {arch.get('vocab_size', '-')}")
    print(f"  tensors:      {t['count']}  ({t['parameters']:,} parameters, {output.human_bytes(t['bytes'])}, "
          + ", ".join(f"{k} x{v}" for k, v in t["dtypes"].items()) + ")")
    src = info["source"]
    where = f"{src['hub_repo']}@{src['hub_revision']}" if src["hub_repo"] else (src["path"] or "made by zoo")
    print(f"  source:       {where}{'  (in place)' if src['in_place'] else ''}")
    print(f"  tasks:        {', '.join(info['tasks']) or '-'}")
    print(f"  tags:         {', '.join(info['tags']) or '-'}")
    print(f"  created:      {info['created_at']}")
    if info["parents"]:
        print("  parents:      " + ", ".join(f"{p['role']}={p['ref']}" for p in info["parents"]))
    if info["recipe"]:
        print(f"  recipe:       {info['recipe']}")
    if info["dependents"]:
        print(f"  used by:      {', '.join(info['dependents'])}")
    print("  files:")
    for f in info["files"]:
        print(f"    {f['path']:<36} {output.human_bytes(f['size']):>10}  sha256:{f['sha256'][:16]}")
    if info["metrics"]:
        print("  metrics:")
        for m in info["metrics"]:
            print(f"    {m['task'] or '-'}: {m['metric']} = {m['value']:.4f}  ({m['split'] or '-'}, {m['measured_at']})")


@app.command()
def lineage(name: str, as_json: bool = JsonOpt) -> None:
    """The tree of models a model was made from."""
    node = _open().lineage(name)
    if as_json:
        output.emit_json(node)
    else:
        print("\n".join(output.tree(node)))


@app.command()
def check(
    models: list[str] = typer.Argument(..., help="Registry names or paths."),
    base: Optional[str] = typer.Option(None, "--base", "-b", help="Compare against this base (name or path)."),
    as_json: bool = JsonOpt,
) -> None:
    """Check that experts line up with their base before a merge. Exits 1 on any error."""
    reports = _open(create=False).check(models, base=base)
    if as_json:
        output.emit_json([r.to_dict() for r in reports])
    else:
        for rep in reports:
            status = "ok" if rep.ok else f"{len(rep.errors)} error(s)"
            print(f"{rep.model} vs {rep.base}: {status}")
            for f in rep.findings:
                where = f"{f.tensor}: " if f.tensor else ""
                print(f"  {f.severity:<7} {f.kind:<7} {where}{f.detail}")
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


@app.command()
def verify(name: Optional[str] = typer.Argument(None), as_json: bool = JsonOpt) -> None:
    """Re-hash stored files and report every file that changed or went missing."""
    with output.progress_bars() as progress:
        problems = _open().verify(name, progress=progress)
    if as_json:
        output.emit_json(problems)
    elif not problems:
        print("all files match their sha256")
    else:
        for p in problems:
            print(f"{p['problem']:<8} {p['model']}  {p['file']}  ({p['path']})")
    if problems:
        raise typer.Exit(1)


@app.command()
def export(name: str, dest: Path) -> None:
    """Rebuild a model's standard Hugging Face folder from the store."""
    with output.progress_bars() as progress:
        out = _open().export(name, dest, progress=progress)
    print(f"exported {name} to {out}")


@app.command()
def tag(name: str, tags: list[str] = typer.Argument(None),
        remove: list[str] = typer.Option([], "--remove", "-r", help="A tag to remove (repeatable).")) -> None:
    """Add (and with --remove, drop) tags on a model."""
    now = _open().tag(name, add=tags or [], remove=remove)
    print(f"{name}: {', '.join(now) or '(no tags)'}")


@app.command()
def rm(name: str, force: bool = typer.Option(False, "--force", help="Remove even if other models depend on it.")) -> None:
    """Remove a model, and the stored blobs no other model uses."""
    res = _open().remove(name, force=force)
    extra = f"; {len(res['dependents'])} dependent(s) keep their lineage by name" if res["dependents"] else ""
    print(f"removed {res['removed']} ({res['blobs_freed']} blob(s) freed{extra})")


@app.command()
def tasks(as_json: bool = JsonOpt) -> None:
    """List registered tasks."""
    rows = _open().tasks()
    if as_json:
        output.emit_json(rows)
        return
    for row in rows:
        row["n_labels"] = len(row["labels"] or [])
    output.table(rows, [("name", "TASK"), ("n_labels", "LABELS"), ("splits", "SPLITS"), ("description", "DATA")])


@app.command()
def merge(
    recipe: Optional[Path] = typer.Argument(None, help="A YAML recipe (mergekit's format)."),
    models: list[str] = typer.Argument(None, help="With --method: the models to merge (names or paths)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", help="Merge method, instead of a recipe."),
    base: Optional[str] = typer.Option(None, "--base", "-b", help="Base model (name or path), with --method."),
    param: list[str] = typer.Option([], "--param", "-p", help="KEY=VALUE, e.g. density=0.2 (repeatable)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Register the result under this name."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Write the result to this new folder instead."),
    dtype: str = typer.Option("float32", "--dtype", help="Compute dtype."),
    out_dtype: Optional[str] = typer.Option(None, "--out-dtype", help="Saved dtype (default: the base's)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for DARE and learned merges (default 0)."),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    shard_size: int = typer.Option(5_000_000_000, "--shard-size", help="Bytes per output shard."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Learned merges: optimisation steps."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learned merges: learning rate."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Learned merges: examples per task per step."),
    as_json: bool = JsonOpt,
) -> None:
    """Merge experts into one model, streaming tensor by tensor, and register it.

    Learned methods (adamerging, concrete_ta, concrete_adamerging, parity) first run the
    model on each task's data; --steps, --lr and --batch-size set their loop. parity
    prints its table per round and task."""
    import zoo.merge as merge_api

    loop = [f"{k}={v}" for k, v in (("steps", steps), ("lr", lr), ("batch_size", batch_size)) if v is not None]
    if method is not None:
        items = ([str(recipe)] if recipe is not None else []) + list(models or [])
        rec = merge_api.from_cli(method, base, items, [*param, *loop], dtype=dtype, out_dtype=out_dtype,
                                 seed=seed or 0)
    elif recipe is not None:
        if models:
            raise ZooError("give either a recipe file or --method with models, not both")
        rec = merge_api.load(recipe)
        rec = merge_api.with_overrides(rec, [*param, *loop], seed=seed)
    else:
        raise ZooError("give a recipe file, or --method with --base and the models to merge")
    reg = _registry_for(out)
    with output.progress_bars() as progress, output.training_bar(f"learning {out or out_dir}") as report:
        info = merge_api.run(rec, out, registry=reg, out_dir=out_dir, device=device, shard_bytes=shard_size,
                             progress=progress, report=report, log=lambda m: print(m, file=sys.stderr))
    if as_json:
        output.emit_json(info)
        return
    if info.get("parity"):
        print_parity(info["parity"])
    if out is not None:
        print(f"merged {len(rec.models)} model(s) with {rec.merge_method} into {info['ref']}")
    else:
        print(f"merged {len(rec.models)} model(s) with {rec.merge_method} into {info['path']}")


def _maybe_open():
    """The registry if there is one (to resolve names), else None (paths only)."""
    from zoo.registry.paths import registry_path

    return _open() if registry_path(State.registry).exists() else None


def _registry_for(out: Optional[str]):
    """For a command that makes a model: the registry to register ``out`` in (created if
    needed), or without ``out`` the registry if there is one, to resolve names."""
    return _open(create=True) if out is not None else _maybe_open()


@app.command()
def protect(
    source: str = typer.Argument(..., help="The model to protect (registry name or model folder)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Register the protected model under this name."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Write it to this new folder instead."),
    key_file: Optional[Path] = typer.Option(None, "--key-file",
                                            help="Where to write the key (default: registry.keys/NAME@1.key)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Key seed, for reproducible output (default: 128 "
                                                             "random bits; a small seed can be guessed)."),
    max_cond: Optional[float] = typer.Option(None, "--max-cond",
                                             help="Bound on each transform's condition number "
                                                  "(default 1000 for float32, 30 for bf16/fp16)."),
    verify: bool = typer.Option(False, "--verify", help="Run both models with transformers and refuse a result "
                                                        "whose outputs differ past the tolerance."),
    shard_size: int = typer.Option(5_000_000_000, "--shard-size", help="Bytes per output shard."),
    as_json: bool = JsonOpt,
) -> None:
    """Make a model unmergeable without changing what it computes (MergeLock)."""
    import zoo.protect as protect_api

    reg = _registry_for(out)
    with output.progress_bars() as progress:
        info = protect_api.protect(source, out, registry=reg, out_dir=out_dir, seed=seed, max_cond=max_cond,
                                   key_file=key_file, verify=verify, shard_bytes=shard_size, progress=progress)
    if as_json:
        output.emit_json(info)
        return
    lock = info["lock"]
    print(f"protected {source} into {info.get('ref') or info['path']}: {lock['attention_layers']} attention "
          f"layers ({lock['model_type']}), cond QK ≤ {lock['max_cond_qk']:.3g}, VO ≤ {lock['max_cond_vo']:.3g}")
    if "verify" in info:
        v = info["verify"]
        print(f"verified on {v['input_shape']}: max abs error {v['max_abs_error']:.2e}, max relative "
              f"{v['max_rel_error']:.2e}, top-1 agreement {100 * v['top1_agreement']:.1f}%, KL {v['kl']:.2e}")
    print(f"key {info['key_id']} written to {info['key_file']} (mode 0600); keep it: it is what unlocks the model")


@app.command()
def unlock(
    source: str = typer.Argument(..., help="The protected model (registry name or model folder)."),
    key: Optional[Path] = typer.Option(None, "--key", help="Key file (default: the registry's key)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Register the restored model under this name."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", help="Write it to this new folder instead."),
    kind: Optional[str] = typer.Option(None, "--kind", help="Kind to register (default: the source's original)."),
    shard_size: int = typer.Option(5_000_000_000, "--shard-size", help="Bytes per output shard."),
    as_json: bool = JsonOpt,
) -> None:
    """Restore a protected model's original weights with its key."""
    import zoo.protect as protect_api

    reg = _registry_for(out)
    with output.progress_bars() as progress:
        info = protect_api.unlock(source, out, registry=reg, out_dir=out_dir, key_file=key, kind=kind,
                                  shard_bytes=shard_size, progress=progress)
    if as_json:
        output.emit_json(info)
        return
    u = info["unlock"]
    err = (f"; largest relative error against {u['compared_with']}: {u['max_rel_error']:.2e} ({u['dtype']})"
           if u.get("compared_with") else "")
    print(f"unlocked {source} into {info.get('ref') or info['path']} ({u['tensors_transformed']} tensors){err}")


EndpointOpt = typer.Option(None, "--endpoint", help="Hub URL (default: $HF_ENDPOINT, else huggingface.co). "
                                                    "The token comes from $HF_TOKEN or `hf auth login`.")


@app.command()
def pull(
    repo: str = typer.Argument(..., help="namespace/name, optionally @revision (branch or commit sha)."),
    name: Optional[str] = typer.Option(None, "--name", "-n", help="Registry name (default: the repo's name)."),
    kind: Optional[str] = typer.Option(None, "--kind", "-k", help="base | expert | adapter | merged | protected "
                                                                   "(default: from the model card's tags)."),
    base: Optional[str] = typer.Option(None, "--base", "-b", help="The base model (registry name), for an expert."),
    endpoint: Optional[str] = EndpointOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Download a model from a Hub (safetensors only), verify it and register it."""
    from zoo.hub.client import pull as pull_api

    with output.progress_bars() as progress:
        info = pull_api(_open(create=True), repo, name=name, kind=kind, base=base, endpoint=endpoint,
                        progress=progress)
    if as_json:
        output.emit_json(info)
        return
    src = info["source"]
    if info["pulled"]:
        print(f"pulled {src['hub_repo']}@{src['hub_revision'][:12]} into {info['ref']} ({info['kind']}, "
              f"{len(info['files'])} files, {output.human_bytes(info['tensors']['bytes'])}; every file checked "
              "against the Hub's hashes)")
    else:
        print(f"{info['ref']} already is {src['hub_repo']}@{src['hub_revision'][:12]}; nothing to do")


@app.command()
def push(
    name: str = typer.Argument(..., help="The registered model to publish."),
    repo: str = typer.Argument(..., help="namespace/name of the Hub repository (created if missing)."),
    private: bool = typer.Option(False, "--private", help="Create the repository private (an existing one keeps its "
                                                        "visibility)."),
    revision: Optional[str] = typer.Option(None, "--revision", help="Branch to commit to (default: main)."),
    no_protect: bool = typer.Option(False, "--no-protect", help="Push an expert's or a merge's weights "
                                                                "unprotected (by default they are MergeLock-"
                                                                "protected first)."),
    endpoint: Optional[str] = EndpointOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Publish a model to a Hub in one commit, MergeLock-protected unless --no-protect."""
    from zoo.publish import publish

    with output.progress_bars() as progress:
        info = publish(_open(), name, repo, protect_weights=not no_protect, private=private, branch=revision,
                       endpoint=endpoint, progress=progress)
    if as_json:
        output.emit_json(info)
        return
    if info["protected_now"]:
        print(f"protected {info['source']} as {info['pushed']} (its key stays in this registry)")
    what = "protected" if info["kind"] == "protected" else "unprotected"
    if info["unchanged"]:
        print(f"{info['repo_id']}@{info['branch']} already holds {info['pushed']} ({what}) at commit "
              f"{info['commit'][:12]}; nothing to push")
        return
    print(f"pushed {info['pushed']} ({what}, {info['files']} files, {output.human_bytes(info['bytes'])}) to "
          f"{info['repo_id']}@{info['branch']}: commit {info['commit'][:12]} on {info['parent'][:12]}")
    print(info["url"])


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (default: loopback only)."),
    port: int = typer.Option(8000, "--port", "-p", help="Port (0: any free one)."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="Tokens that may write (default: "
                                                                         "registry.tokens beside the registry)."),
    private_reads: bool = typer.Option(False, "--private-reads", help="Reads need a token too (default: open)."),
    lfs_threshold: int = typer.Option(10 * 1024 * 1024, "--lfs-threshold",
                                      help="Files this big or bigger upload through LFS, not inline."),
    quiet: bool = typer.Option(False, "--quiet", help="No access log."),
) -> None:
    """Serve the registry as a Hugging Face Hub-compatible endpoint (HF_ENDPOINT=URL)."""
    from zoo.hub.server import ServeSettings, serve as serve_api
    from zoo.hub.tokens import TokenSet, default_token_file

    reg = _open(create=True)
    tokens = TokenSet.load(token_file or default_token_file(reg.path), missing_ok=token_file is None)
    settings = ServeSettings(tokens, open_reads=not private_reads, lfs_threshold=lfs_threshold)

    def ready(url: str) -> None:
        writers = f"{len(tokens)} token(s)" if len(tokens) else "no tokens yet: read-only until `zoo token create`"
        print(f"serving {reg.path} at {url} ({writers}; reads {'need a token' if private_reads else 'open'}). "
              f"Clients: HF_ENDPOINT={url} HF_HUB_DISABLE_XET=1", flush=True)

    serve_api(reg, settings, host=host, port=port, on_ready=ready, access_log=not quiet)


@app.command()
def gc(older_than: float = typer.Option(7200, "--older-than", help="Only blobs at least this many seconds old."),
       as_json: bool = JsonOpt) -> None:
    """Remove stored blobs nothing uses (e.g. uploads to `zoo serve` that were never committed)."""
    info = _open().collect(older_than=older_than)
    if as_json:
        output.emit_json(info)
    else:
        print(f"removed {info['blobs_removed']} unused blob(s), {output.human_bytes(info['bytes_freed'])}")


token_app = typer.Typer(no_args_is_help=True, help="Tokens for `zoo serve`.")
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    name: str = typer.Option(..., "--name", "-n", help="Who or what holds the token."),
    scope: str = typer.Option("write", "--scope", help="write (push and pull) or read."),
    token_file: Optional[Path] = typer.Option(None, "--token-file", help="Token file (default: registry.tokens "
                                                                         "beside the registry)."),
) -> None:
    """Create a token for `zoo serve`; it is shown once, and only its hash is kept."""
    from zoo.registry.paths import registry_path
    from zoo.hub.tokens import create_token, default_token_file

    file = token_file or default_token_file(registry_path(State.registry))
    token = create_token(file, name, scope)
    print(token)
    print(f"({scope} token {name!r} added to {file}; it is not shown again. Clients: HF_TOKEN=<token>)",
          file=sys.stderr)


key_app = typer.Typer(no_args_is_help=True, help="Move protection keys between machines.")
app.add_typer(key_app, name="key")


@key_app.command("export")
def key_export(name: str = typer.Argument(..., help="The protected model."),
               out: Optional[Path] = typer.Option(None, "--out", "-o", help="Key file (default: NAME@V.key)."),
               as_json: bool = JsonOpt) -> None:
    """Write a protected model's key from the registry to a key file (mode 0600)."""
    import zoo.protect as protect_api

    path = protect_api.export_key(_open(), name, out)
    if as_json:
        output.emit_json({"model": name, "key_file": str(path)})
    else:
        print(f"wrote the key of {name} to {path} (mode 0600)")


@key_app.command("import")
def key_import(file: Path = typer.Argument(..., help="A key file from `zoo key export` or `zoo protect`."),
               model: Optional[str] = typer.Option(None, "--model", "-m", help="The protected model (default: "
                                                                                "the one the file names)."),
               replace: bool = typer.Option(False, "--replace", help="Replace a different stored key."),
               as_json: bool = JsonOpt) -> None:
    """Store a key file's key in the registry, for the protected model it belongs to."""
    import zoo.protect as protect_api

    info = protect_api.import_key(_open(), file, model, replace=replace)
    if as_json:
        output.emit_json(info)
    else:
        print(f"stored key {info['key_id']} for {info['model']}")


@app.command("eval")
def eval_(name: str, task: list[str] = typer.Option([], "--task", "-t", help="Task (default: the model's own)."),
          split: str = typer.Option("test", "--split"), as_json: bool = JsonOpt) -> None:
    """Measure a model on a task's split and record the metric."""
    from zoo.evaluate import evaluate

    results = evaluate(_open(), name, task or None, split=split)
    if as_json:
        output.emit_json(results)
    else:
        output.table(results, [("model", "MODEL"), ("task", "TASK"), ("split", "SPLIT"), ("value", "ACCURACY"),
                               ("n", "N")])


@app.command()
def demo(quick: bool = typer.Option(False, "--quick", help="A tiny, fast build of the same zoo (for CI)."),
         learned: Optional[bool] = typer.Option(None, "--learned/--no-learned",
                                                help="Also the learned merges (default: on, off with --quick)."),
         protection: bool = typer.Option(True, "--protect/--no-protect",
                                         help="Also protect one expert with MergeLock and merge with it."),
         publishing: bool = typer.Option(True, "--publish/--no-publish",
                                         help="End by pushing the best merge (protected) through a local "
                                              "`zoo serve` and pulling it back."),
         as_json: bool = JsonOpt) -> None:
    """Build the demo zoo offline (cached), register it, merge it, and print the accuracy
    of each expert and each merge per task; then protect one expert, merge with it and
    attack it; then publish the best merge through a local `zoo serve` and pull it back."""
    from zoo.demo import build as demo_mod

    from zoo.demo.merges import merge_demo, parity_summary
    from zoo.demo.protection import protect_demo, publish_demo

    cfg = demo_mod.QUICK if quick else demo_mod.FULL
    log = (lambda m: print(m, file=sys.stderr)) if as_json else print
    reg = _open(create=True)
    res = demo_mod.run_demo(reg, cfg, log=log)
    learned = not quick if learned is None else learned
    with output.training_bar("learning") as report:
        rows = merge_demo(reg, res, log=log, learned=learned, report=report)
        locked = protect_demo(reg, res, rows, log=log, learned=learned, report=report) if protection else None
    parity = parity_summary(reg, rows, res.config.prefix)
    published = publish_demo(reg, res, rows, log=log) if publishing else None
    where = {"registry": str(res.registry), "store": str(res.store), "keys": str(reg.keys_dir)}
    if as_json:
        output.emit_json({"base": res.base, "experts": res.experts, "accuracy": res.accuracy, "built": res.built,
                          "seconds": res.seconds, **where, "table": rows, "parity": parity, "protection": locked,
                          "published": published})
        return
    print()
    tasks = list(res.experts)
    table = [{"method": r["method"], **{t: f"{100 * r[t]:.1f}" for t in [*tasks, "avg"]}} for r in rows]
    output.table(table, [("method", "TEST ACCURACY %")] + [(t, t) for t in tasks] + [("avg", "AVG")])
    for p in parity:
        vs_entropy = "" if p["entropy_adamerging_avg"] is None else \
            f"; label-free entropy AdaMerging: {100 * p['entropy_adamerging_avg']:.1f}"
        print(f"\n{p['method']}: disagreement with the experts on their pools "
              f"{100 * p['disagreement_start']:.1f}% → {100 * p['disagreement_end']:.1f}% "
              f"({100 * (1 - p['disagreement_end'] / p['disagreement_start']):.0f}% less, target ≥ 50%); "
              f"average accuracy {100 * p['start_avg']:.1f} → {100 * p['avg']:.1f}, "
              f"{100 * (p['avg'] - p['ta_avg']):+.1f} points over task arithmetic (target ≥ +10){vs_entropy}")
    if locked is not None:
        print()
        _print_protection(locked, tasks)
    if published is not None:
        pub = published
        print(f"\npublished {pub['merge']} ({pub['method']}) through zoo serve as {pub['pushed']} "
              f"(MergeLock-protected) and pulled it back as {pub['pulled']}: average test accuracy "
              f"{100 * pub['avg_before']:.1f} → {100 * pub['avg_after']:.1f} (largest change on a task "
              f"{100 * pub['max_change']:.2f} points)")
    print(f"\nbase: {res.base}   experts: {', '.join(res.experts.values())}")
    print(f"({'built' if res.built else 'cached'}; {res.seconds:.0f} s)")
    print(f"registry: {res.registry}\nstore:    {res.store}\nkeys:     {reg.keys_dir}\ncache:    {res.cache}")
    p = res.config.prefix
    print(f"next: `zoo list`, `zoo lineage {p}-ties`, `zoo check {p}-parity`, `zoo eval {p}-ta --task hflip`")


def print_parity(rows: list[dict]) -> None:
    """A parity merge's table: per round (0 = the start) and task, the parity set, the
    disagreement with the expert on the pool, and accuracy where it was measured; the
    round whose merge was kept is marked."""
    table = []
    for r in sorted({x["round"] for x in rows}):
        these = [x for x in rows if x["round"] == r]
        accs = [x["accuracy"] for x in these if x["accuracy"] is not None]
        for x in these + [{"task": "avg", "pool": sum(x["pool"] for x in these),
                           "reliable": sum(x["reliable"] for x in these), "parity": sum(x["parity"] for x in these),
                           "disagreement": sum(x["disagreement"] for x in these) / len(these),
                           "accuracy": sum(accs) / len(accs) if len(accs) == len(these) else None}]:
            table.append({"round": f"{r}{' kept' if these[0]['kept'] else ''}", "task": x["task"], "pool": x["pool"], "reliable": x["reliable"],
                          "parity": x["parity"], "dis": f"{100 * x['disagreement']:.1f}",
                          "acc": "" if x["accuracy"] is None else f"{100 * x['accuracy']:.1f}"})
    output.table(table, [("round", "ROUND"), ("task", "TASK"), ("pool", "POOL"), ("reliable", "RELIABLE"),
                         ("parity", "PARITY SET"), ("dis", "DISAGREE %"), ("acc", "ACCURACY %")])


def _print_protection(locked: dict, tasks: list[str]) -> None:
    s = locked["summary"]
    victim = s["victim"]
    table = [{"method": r["method"], **{t: f"{100 * r[t]:.1f}" if t in r else "" for t in tasks}}
             for r in locked["rows"]]
    output.table(table, [("method", f"MERGELOCK ({victim} protected) %")] + [(t, t) for t in tasks])
    v = s["verify"]
    print(f"\nprotected {victim} expert vs original: max relative logit error {v['max_rel_error']:.1e}, "
          f"top-1 agreement {100 * v['top1_agreement']:.0f}% (cond QK ≤ {v['max_cond_qk']:.0f}, "
          f"VO ≤ {v['max_cond_vo']:.0f}); chance on {victim}: {100 * s['chance']:.1f}%")
    for key, label in (("ta", "task arithmetic"), ("ties", "TIES")):
        m = s[key]
        lost = "n/a" if m["advantage_lost"] is None else f"{100 * m['advantage_lost']:.0f}%"
        back = "n/a" if m["recovered"] is None else f"{100 * m['recovered']:.0f}%"
        print(f"{label}: protection removes {lost} of the merge's advantage over chance on {victim} "
              f"(target ≥ 80%); the realignment attack recovers {back} of what it removed")
        if m.get("parity") is not None:
            again = "n/a" if m["parity_recovered"] is None else f"{100 * m['parity_recovered']:.0f}%"
            print(f"{label}, then parity distillation with the protected expert teaching {victim}: {victim} at "
                  f"{100 * m['parity']:.1f}% (recovers {again}); the protected expert's labels are the original's")
    print("MergeLock stops naive merging only: the data-free attack above undoes much of it, and outputs are "
          "unchanged, so distillation from the protected expert works as from the original.")


def main() -> None:
    """Entry point: user errors become one line on stderr and exit 1, never a traceback."""
    try:
        rv = app(standalone_mode=False)
        if rv == 130:  # typer turns Ctrl-C into exit code 130
            raise KeyboardInterrupt
        if isinstance(rv, int) and rv:
            sys.exit(rv)
    except ZooError as e:
        output.error(str(e))
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        output.error("interrupted; no half-finished change was saved")
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            output.error("aborted")
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
