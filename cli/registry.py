"""The catalogue's commands: register, list, inspect, check, tag, remove and measure models."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from zoo.cli import render
from zoo.cli.options import JsonOpt, RegistryOpt, Typer, open_registry, registry_location

app = Typer()
# `zoo registry ...`: commands on a whole registry.
registry_app = Typer(name="registry", no_args_is_help=True,
                     help="Whole registries: copy one between SQLite and PostgreSQL.")
# `zoo task ...`: commands on one task (`zoo tasks` lists them all).
task_app = Typer(name="task", no_args_is_help=True,
                 help="Tasks: register a generative task from a JSONL file of prompts.")

KINDS_HELP = "base | expert | adapter | merged | protected"


@app.command()
def init(as_json: bool = JsonOpt, registry: Optional[Path] = RegistryOpt) -> None:
    """Create an empty registry (and its blob store) in the working directory."""
    r = open_registry(create=True)
    r.store.ensure()
    if as_json:
        render.emit_json({"registry": str(r.path), "store": r.store.shown,
                          **({"cache": str(r.store.root)} if r.store.remote else {})})
    else:
        print(f"registry: {r.path}\nstore:    {r.store.shown}" + (f"\ncache:    {r.store.root}" if r.store.remote else ""))


@app.command()
def add(
    path: Path = typer.Argument(..., metavar="PATH", help="A model folder, PEFT adapter folder or .safetensors file."),
    name: str = typer.Option(..., "--name", "-n", metavar="NAME",
                             help="Registry name: letters, digits, '.', '-', '_'."),
    kind: str = typer.Option("expert", "--kind", "-k", metavar="KIND", help=KINDS_HELP),
    base: Optional[str] = typer.Option(None, "--base", "-b", metavar="MODEL", help="The base model (registry name)."),
    task: list[str] = typer.Option([], "--task", "-t", metavar="TASK",
                                   help="A task this model is for (repeatable)."),
    tag: list[str] = typer.Option([], "--tag", metavar="TAG", help="A tag (repeatable)."),
    in_place: bool = typer.Option(False, "--in-place", help="Register the files where they are; do not copy."),
    new_version: bool = typer.Option(False, "--new-version", help="Add a new version of an existing name."),
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Register a checkpoint, copying its files into the content-addressed store."""
    r = open_registry(create=True)
    with render.progress_bars() as progress:
        info = r.add(path, name, kind, base=base, tasks=task, tags=tag, in_place=in_place,
                     new_version=new_version, progress=progress)
    if as_json:
        render.emit_json(info)
    else:
        print(f"added {info['ref']} ({info['kind']}, {info['parameters']:,} parameters, "
              f"{render.human_bytes(info['bytes'])})")


@app.command("list")
def list_(
    kind: Optional[str] = typer.Option(None, "--kind", "-k", metavar="KIND", help=f"Only this kind: {KINDS_HELP}."),
    base: Optional[str] = typer.Option(None, "--base", "-b", metavar="MODEL", help="Only models on this base."),
    task: Optional[str] = typer.Option(None, "--task", "-t", metavar="TASK", help="Only models for this task."),
    tag: Optional[str] = typer.Option(None, "--tag", metavar="TAG", help="Only models with this tag."),
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """List registered models."""
    # The fast path: sqlite3 (or psycopg) only, neither SQLAlchemy nor torch.
    from zoo.registry.listing import list_models, model_lines
    from zoo.registry.paths import existing_registry

    where = registry_location()
    if where.file is not None:
        existing_registry(where.file)
    if as_json:
        render.emit_json_lines(model_lines(where, kind=kind, base=base, task=task, tag=tag))
        return
    rows = list_models(where, kind=kind, base=base, task=task, tag=tag)
    if not rows:
        print("no models; add one with `zoo add PATH --name NAME --kind base`")
        return
    for row in rows:
        row["size"] = render.human_bytes(row["bytes"])
    render.table(rows, [("ref", "MODEL"), ("kind", "KIND"), ("base", "BASE"), ("model_type", "TYPE"),
                        ("parameters", "PARAMS"), ("size", "SIZE"), ("tasks", "TASKS"), ("tags", "TAGS")])


@app.command()
def show(name: str = typer.Argument(..., metavar="MODEL", help="A registry name, optionally NAME@VERSION."),
         as_json: bool = JsonOpt, registry: Optional[Path] = RegistryOpt) -> None:
    """Everything the registry knows about one model."""
    info = open_registry().show(name)
    if as_json:
        render.emit_json(info)
    else:
        _print_model(info)


def _print_model(info: dict[str, Any]) -> None:
    arch = info["architecture"]
    t = info["tensors"]
    print(f"{info['ref']}  ({info['kind']}, {info['form']})")
    print(f"  base:         {info['base'] or '-'}")
    print(f"  architecture: {arch.get('model_type', '-')}  hidden {arch.get('hidden_size', '-')}  "
          f"layers {arch.get('num_layers', '-')}  heads {arch.get('num_heads', '-')}  "
          f"kv heads {arch.get('num_kv_heads', '-')}  vocab {arch.get('vocab_size', '-')}")
    if "decoder_layers" in arch:  # an encoder-decoder: each side's counts
        print(f"                encoder layers {arch.get('encoder_layers', '-')}  heads "
              f"{arch.get('encoder_heads', '-')}  decoder layers {arch['decoder_layers']}  heads "
              f"{arch.get('decoder_heads', '-')}")
    print(f"  tensors:      {t['count']}  ({t['parameters']:,} parameters, {render.human_bytes(t['bytes'])}, "
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
    stats = (info["recipe"] or {}).get("learned", {}) or {}
    if stats.get("mask_stats"):
        print(f"  mask:         {mask_line(stats['mask_stats'])}")
    if info["dependents"]:
        print(f"  used by:      {', '.join(info['dependents'])}")
    print("  files:")
    for f in info["files"]:
        print(f"    {f['path']:<36} {render.human_bytes(f['size']):>10}  sha256:{f['sha256'][:16]}")
    if info["metrics"]:
        print("  metrics:")
        for m in info["metrics"]:
            print(f"    {m['task'] or '-'}: {m['metric']} = {m['value']:.4f}  "
                  f"({m['split'] or '-'}, {m['measured_at']})")


def mask_line(stats: dict[str, float]) -> str:
    """A learned Concrete mask in one line: how much of it a draw keeps more often than
    not, and how binary it is."""
    return (f"{100 * stats['above_half']:.1f}% of entries above ½, binariness {stats['binariness']:.3f} "
            "(mean |2p - 1| of the keep probabilities: 0 is a soft re-weighting, 1 a fixed subspace)")


@app.command()
def lineage(name: str = typer.Argument(..., metavar="MODEL", help="A registry name."),
            as_json: bool = JsonOpt, registry: Optional[Path] = RegistryOpt) -> None:
    """The tree of models a model was made from."""
    node = open_registry().lineage(name)
    if as_json:
        render.emit_json(node)
    else:
        print("\n".join(render.tree(node)))


@app.command()
def check(
    models: list[str] = typer.Argument(..., metavar="MODEL", help="Registry names or paths."),
    base: Optional[str] = typer.Option(None, "--base", "-b", metavar="MODEL",
                                       help="Compare against this base (name or path)."),
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Check that experts line up with their base before a merge. Exits 1 on any error."""
    reports = open_registry(create=False).check(models, base=base)
    if as_json:
        render.emit_json([r.to_dict() for r in reports])
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
def verify(name: Optional[str] = typer.Argument(None, metavar="MODEL", help="One model (default: all)."),
           as_json: bool = JsonOpt, registry: Optional[Path] = RegistryOpt) -> None:
    """Re-hash stored files and report every file that changed or went missing. Exits 1 on any."""
    with render.progress_bars() as progress:
        problems = open_registry().verify(name, progress=progress)
    if as_json:
        render.emit_json(problems)
    elif not problems:
        print("all files match their sha256")
    else:
        for p in problems:
            print(f"{p['problem']:<8} {p['model']}  {p['file']}  ({p['path']})")
    if problems:
        raise typer.Exit(1)


@app.command()
def export(name: str = typer.Argument(..., metavar="MODEL", help="A registry name."),
           dest: Path = typer.Argument(..., metavar="DIR", help="A new (or empty) folder."),
           as_json: bool = JsonOpt, registry: Optional[Path] = RegistryOpt) -> None:
    """Rebuild a model's standard Hugging Face folder from the store."""
    with render.progress_bars() as progress:
        out = open_registry().export(name, dest, progress=progress)
    if as_json:
        render.emit_json({"model": name, "path": str(out)})
    else:
        print(f"exported {name} to {out}")


@app.command()
def tag(name: str = typer.Argument(..., metavar="MODEL", help="A registry name."),
        tags: list[str] = typer.Argument(None, metavar="TAG", help="Tags to add."),
        remove: list[str] = typer.Option([], "--remove", "-r", metavar="TAG", help="A tag to remove (repeatable)."),
        as_json: bool = JsonOpt, registry: Optional[Path] = RegistryOpt) -> None:
    """Add (and with --remove, drop) tags on a model."""
    now = open_registry().tag(name, add=tags or [], remove=remove)
    if as_json:
        render.emit_json({"model": name, "tags": now})
    else:
        print(f"{name}: {', '.join(now) or '(no tags)'}")


@app.command()
def rm(name: str = typer.Argument(..., metavar="MODEL", help="A registry name."),
       force: bool = typer.Option(False, "--force", help="Remove even if other models depend on it."),
       as_json: bool = JsonOpt, registry: Optional[Path] = RegistryOpt) -> None:
    """Remove a model, and the stored blobs no other model uses."""
    res = open_registry().remove(name, force=force)
    if as_json:
        render.emit_json(res)
        return
    extra = f"; {len(res['dependents'])} dependent(s) keep their lineage by name" if res["dependents"] else ""
    print(f"removed {res['removed']} ({res['blobs_freed']} blob(s) freed{extra})")


@app.command()
def tasks(as_json: bool = JsonOpt, registry: Optional[Path] = RegistryOpt) -> None:
    """List registered tasks: classification (labels) or generative (prompts), and their splits."""
    from zoo.evaluate import task_kind

    rows = [{**row, "kind": task_kind(row)} for row in open_registry().tasks()]
    if as_json:
        render.emit_json(rows)
        return
    for row in rows:
        row["n_labels"] = len(row["labels"] or []) if row["kind"] != "generative" else None
        row["split_sizes"] = [f"{k}={v}" for k, v in (row["splits"] or {}).items()]
    render.table(rows, [("name", "TASK"), ("kind", "KIND"), ("n_labels", "LABELS"), ("split_sizes", "SPLITS"),
                        ("description", "DATA")])


@task_app.command("add")
def task_add(
    name: str = typer.Argument(..., metavar="NAME", help="Task name: letters, digits, '.', '-', '_'."),
    path: Path = typer.Argument(..., metavar="FILE", help="JSONL, one record a line: a \"prompt\" and an "
                                                          "optional \"answer\", or chat \"messages\"; each with an "
                                                          "optional \"split\" (default pool)."),
    description: Optional[str] = typer.Option(None, "--description", "-d", metavar="TEXT",
                                              help="What the task is."),
    model: Optional[str] = typer.Option(None, "--model", "-m", metavar="MODEL",
                                        help="Also check that every prompt and answer fit this registered "
                                             "model's context, as its tokenizer counts them."),
    replace: bool = typer.Option(False, "--replace", help="Replace the data of a task of that name."),
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Register a generative task: prompts, an unlabeled pool, with optional reference
    answers for `zoo eval`. Every line is checked first; a bad file registers nothing."""
    from zoo.evaluate import add_prompt_task

    info = add_prompt_task(open_registry(create=True), name, path, description=description, model=model,
                           replace=replace)
    if as_json:
        render.emit_json(info)
    else:
        splits = ", ".join(f"{k} {v}" for k, v in info["splits"].items())
        checked = info["metadata"].get("checked_against")
        print(f"added task {info['name']} ({info['kind']}; {splits})"
              + (f"; fits {checked}'s context of {info['metadata']['context']}" if checked else ""))


@app.command("eval")
def eval_(name: str = typer.Argument(..., metavar="MODEL", help="A registry name."),
          task: list[str] = typer.Option([], "--task", "-t", metavar="TASK",
                                         help="Task (repeatable; default: the model's own)."),
          split: str = typer.Option("test", "--split", metavar="SPLIT", help="The task data's split."),
          max_new_tokens: Optional[int] = typer.Option(
              None, "--max-new-tokens", metavar="N", min=1,
              help="Generative tasks: the most tokens a greedy answer may have (default: the longest reference "
                   "answer's, with its end token)."),
          as_json: bool = JsonOpt, registry: Optional[Path] = RegistryOpt) -> None:
    """Measure a model on a task's split and record the metric: accuracy on a
    classification task; on a generative task, the exact match of greedy answers and the
    reference answers' mean log-likelihood, per token (LOGLIK/TOK) and per answer."""
    from zoo.evaluate import LOGLIK_ANSWER, LOGLIK_TOKEN, evaluate

    results = evaluate(open_registry(), name, task or None, split=split, max_new_tokens=max_new_tokens)
    if as_json:
        render.emit_json(results)
    elif all(r["metric"] == "accuracy" for r in results):
        render.table(results, [("model", "MODEL"), ("task", "TASK"), ("split", "SPLIT"), ("value", "ACCURACY"),
                               ("n", "N")])
    else:
        render.table(results, [("model", "MODEL"), ("task", "TASK"), ("split", "SPLIT"), ("metric", "METRIC"),
                               ("value", "VALUE"), (LOGLIK_TOKEN, "LOGLIK/TOK"), (LOGLIK_ANSWER, "LOGLIK/ANSWER"),
                               ("n", "N")])


@app.command()
def gc(older_than: float = typer.Option(7200, "--older-than", metavar="SECONDS",
                                        help="Only blobs at least this many seconds old."),
       as_json: bool = JsonOpt, registry: Optional[Path] = RegistryOpt) -> None:
    """Remove stored blobs nothing uses, such as uploads to `zoo serve` that were never committed."""
    info = open_registry().collect(older_than=older_than)
    if as_json:
        render.emit_json(info)
    else:
        folders = f" and {info['folders_removed']} half-written folder(s) of killed commands" \
            if info["folders_removed"] else ""
        print(f"removed {info['blobs_removed']} unused blob(s){folders}, {render.human_bytes(info['bytes_freed'])}")


@registry_app.command("copy")
def copy(
    source: str = typer.Argument(..., metavar="SRC", help="The registry to copy: a SQLite file or a postgresql:// URL."),
    destination: str = typer.Argument(..., metavar="DST", help="Where to: a new or empty registry, file or URL."),
    from_store: Optional[str] = typer.Option(None, "--from-store", metavar="PATH",
                                             help="SRC's blob store (needed when SRC is a URL)."),
    to_store: Optional[str] = typer.Option(None, "--to-store", metavar="PATH",
                                           help="DST's blob store (needed when DST is a URL)."),
    as_json: bool = JsonOpt,
) -> None:
    """Copy a whole registry, rows and blobs, into a new or empty one (SQLite to
    PostgreSQL, or back). Row counts and every blob's sha256 are checked; on any failure
    the destination is left as it was."""
    from zoo.registry.paths import locate
    from zoo.registry.transfer import copy_registry

    src = locate(source, from_store, use_env=False)
    dst = locate(destination, to_store, use_env=False)
    with render.progress_bars() as progress:
        report = copy_registry(src, dst, progress=progress)
    if as_json:
        render.emit_json(report.as_dict())
    else:
        rows = sum(report.rows.values())
        print(f"copied {report.source} -> {report.destination}: {report.rows.get('models', 0)} models, "
              f"{rows} rows, {report.blobs} blobs ({render.human_bytes(report.bytes)}); row counts and blob "
              "hashes verified")
