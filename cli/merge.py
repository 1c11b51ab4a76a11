"""``zoo merge``: a recipe or ``--method`` with models in, one merged model out.

Its help lists the methods, and ``zoo merge --method X --help`` lists X's parameters
with their defaults, both read from the method classes (``zoo.merge.methods.METHODS``),
so the help cannot drift from the code.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Optional

import typer

from zoo.cli import render
from zoo.cli.options import Command, JsonOpt, RegistryOpt, ShardSizeOpt, Typer, registry_for
from zoo.errors import ZooError

app = Typer()

METHOD_META = "zoo.method"  # where parse_args leaves the --method it saw, for the help


def _method_in(args: list[str]) -> str | None:
    """The value of ``--method`` / ``-m`` among raw arguments, wherever ``--help`` is."""
    for i, a in enumerate(args):
        if a == "--":
            break
        if a in ("--method", "-m") and i + 1 < len(args):
            return args[i + 1]
        if a.startswith("--method="):
            return a.partition("=")[2]
        if a.startswith("-m") and not a.startswith("--") and len(a) > 2:
            return a[2:]
    return None


def summary(doc: str | None) -> str:
    """A docstring's first paragraph on one line, without reST markup."""
    first = (doc or "").strip().split("\n\n")[0]
    return " ".join(first.replace("``", "").split())


def _param_help(p: Any) -> str:
    """A parameter's doc and its default, written as --param KEY=VALUE reads it (YAML);
    a default of None (unset: the doc says what happens) is not shown."""
    if p.default is None:
        return p.doc
    value = ("true" if p.default else "false") if isinstance(p.default, bool) else str(p.default)
    return f"{p.doc}  [default: {value}]" if p.doc else f"[default: {value}]"


class MergeCommand(Command):
    """``zoo merge``'s command: its help ends with the methods, or with one method's parameters."""

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        ctx.meta[METHOD_META] = _method_in(args)
        return super().parse_args(ctx, args)

    def format_help(self, ctx: Any, formatter: Any) -> None:
        super().format_help(ctx, formatter)
        from zoo.merge.methods import METHODS

        name = ctx.meta.get(METHOD_META)
        method = METHODS.get(name) if name else None
        if method is None:
            rows = [(n, summary(type(m).__doc__) + ("  [learned]" if m.learned else "")) for n, m in METHODS.items()]
            title = "Methods (zoo merge --method NAME --help: its parameters)"
            if name:
                title = f"Methods (there is no {name!r})"
            with formatter.section(title):
                formatter.write_dl(rows)
            return
        with formatter.section(f"Method {name}"):
            formatter.write_text(summary(type(method).__doc__))
            formatter.write_paragraph()
            notes = ["needs --base" if method.needs_base else "no base needed"]
            if method.learned:
                notes.append("learned: runs the model on each task's data; --steps, --lr and --batch-size set "
                             "the loop")
            formatter.write_text("; ".join(notes) + ".")
        for title, table in (("Parameters (--param KEY=VALUE)", method.parameters),
                             ("Per-model parameters (--param sets every model's)", method.model_parameters)):
            if table:
                with formatter.section(title):
                    formatter.write_dl([(key, _param_help(p)) for key, p in table.items()])


@app.command(cls=MergeCommand)
def merge(
    recipe: Optional[Path] = typer.Argument(None, metavar="RECIPE", help="A YAML recipe (mergekit's format)."),
    models: list[str] = typer.Argument(None, metavar="MODEL",
                                       help="With --method: the models to merge (names or paths)."),
    method: Optional[str] = typer.Option(None, "--method", "-m", metavar="METHOD",
                                         help="Merge method, instead of a recipe (listed below)."),
    base: Optional[str] = typer.Option(None, "--base", "-b", metavar="MODEL",
                                       help="Base model (name or path), with --method."),
    param: list[str] = typer.Option([], "--param", "-p", metavar="KEY=VALUE",
                                    help="A method parameter, e.g. density=0.2 (repeatable)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="NAME",
                                      help="Register the result under this name."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", metavar="DIR",
                                           help="Write the result to this new folder instead."),
    dtype: Optional[str] = typer.Option(None, "--dtype", metavar="DTYPE",
                                        help="Compute dtype, and saved dtype unless --out-dtype says otherwise "
                                             "(default: each tensor's own, as mergekit)."),
    out_dtype: Optional[str] = typer.Option(None, "--out-dtype", metavar="DTYPE",
                                            help="Saved dtype (default: --dtype, else the base's)."),
    seed: Optional[int] = typer.Option(None, "--seed", metavar="N", help="Seed for DARE and learned merges "
                                                                         "(default 0)."),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help="auto | cpu | cuda"),
    shard_size: int = ShardSizeOpt,
    steps: Optional[int] = typer.Option(None, "--steps", metavar="N", help="Learned merges: optimisation steps."),
    lr: Optional[float] = typer.Option(None, "--lr", metavar="RATE", help="Learned merges: learning rate."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", metavar="N",
                                             help="Learned merges: examples per task per step."),
    nproc: Optional[int] = typer.Option(None, "--nproc", metavar="K",
                                        help="Learned merges: run as K processes on this machine, each step's "
                                             "batches split between them (gloo on the CPU, NCCL on CUDA: one "
                                             "GPU each). Under torchrun, leave it out."),
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
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
        rec = merge_api.with_overrides(merge_api.load(recipe), [*param, *loop], seed=seed)
    else:
        raise ZooError("give a recipe file, or --method with --base and the models to merge "
                       "(`zoo merge --help` lists the methods)")
    from zoo.merge.learned import distributed

    method_ = merge_api.METHODS.get(rec.merge_method)
    if (nproc is not None or distributed.launched() > 1) and method_ is not None and not method_.learned:
        raise ZooError(f"{rec.merge_method} merges tensor by tensor in one process; --nproc and torchrun are "
                       "for the learned methods")
    if nproc is not None and nproc > 1 and distributed.launched() == 1:
        code = distributed.launch(sys.argv[1:], nproc)  # each process runs this command
        if code:  # rank 0 has said why (typer.Exit(130) would make the entry point say it again)
            sys.exit(code)
        return
    reg = registry_for(out)
    with distributed.session(device, nproc) as sync:
        shown = sync.writes  # the other processes stay quiet: rank 0 speaks for the run
        with render.progress_bars(shown) as progress, \
                render.training_bar(f"learning {out or out_dir}", shown) as report:
            info = merge_api.run(rec, out, registry=reg, out_dir=out_dir, device=device, shard_bytes=shard_size,
                                 progress=progress, report=report,
                                 log=(lambda m: print(m, file=sys.stderr)) if shown else None)
    if not shown:
        return
    if as_json:
        render.emit_json(info)
        return
    if info.get("parity"):
        print_parity(info["parity"])
    where = info["ref"] if out is not None else info["path"]
    print(f"merged {len(rec.models)} model(s) with {rec.merge_method} into {where}")


def print_parity(rows: list[dict[str, Any]]) -> None:
    """A parity merge's table: per round (0 = the start) and task, the parity set, the
    disagreement with the expert on the pool, and accuracy (classifiers) or exact match
    (generative tasks) where it was measured; the round whose merge was kept is marked."""
    metric, header = ("exact_match", "EXACT MATCH %") if any("exact_match" in x for x in rows) \
        else ("accuracy", "ACCURACY %")
    table = []
    for r in sorted({x["round"] for x in rows}):
        these = [x for x in rows if x["round"] == r]
        scores = [x[metric] for x in these if x.get(metric) is not None]
        for x in these + [{"task": "avg", "pool": sum(x["pool"] for x in these),
                           "reliable": sum(x["reliable"] for x in these), "parity": sum(x["parity"] for x in these),
                           "disagreement": sum(x["disagreement"] for x in these) / len(these),
                           metric: sum(scores) / len(scores) if len(scores) == len(these) else None}]:
            table.append({"round": f"{r}{' kept' if these[0]['kept'] else ''}", "task": x["task"], "pool": x["pool"],
                          "reliable": x["reliable"], "parity": x["parity"], "dis": f"{100 * x['disagreement']:.1f}",
                          "score": "" if x.get(metric) is None else f"{100 * x[metric]:.1f}"})
    render.table(table, [("round", "ROUND"), ("task", "TASK"), ("pool", "POOL"), ("reliable", "RELIABLE"),
                         ("parity", "PARITY SET"), ("dis", "DISAGREE %"), ("score", header)])
