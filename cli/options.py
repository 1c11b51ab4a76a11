"""What every command group shares: the command class (plain click help), the registry
the command works on, and the options that read the same everywhere (``--registry``,
``--json``, ``--endpoint``).

``--registry`` is a global option (``zoo --registry X list``) that also works after the
subcommand (``zoo list --registry X``); the one given last wins. ``--store`` (the blob
store of a registry on a database server) is global only, or ``$ZOO_STORE``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional

import typer
from typer.core import TyperCommand

from zoo.checkpoints.writer import DEFAULT_SHARD_BYTES

if TYPE_CHECKING:  # the ORM is imported only by the commands that open a registry
    from zoo.registry import Registry
    from zoo.registry.paths import Location


class Command(TyperCommand):
    """A command whose arguments read as in click: ``MODEL``, ``[MODEL]``, ``MODEL...`` in
    the usage line and the help, without typer's ``{MODEL}`` and ``<str>``."""

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        return pieces + [_argument_usage(p) for p in self.get_params(ctx) if p.param_type_name == "argument"]

    def format_options(self, ctx: Any, formatter: Any) -> None:
        args, opts = [], []
        for p in self.get_params(ctx):
            record = p.get_help_record(ctx)
            if record is None:
                continue
            if p.param_type_name == "argument":
                args.append((_argument_name(p), record[1]))
            else:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)


def _argument_name(p: Any) -> str:
    return p.metavar or p.name.upper()


def _argument_usage(p: Any) -> str:
    name = _argument_name(p) + ("..." if p.nargs != 1 else "")
    return name if p.required else f"[{name}]"


class Typer(typer.Typer):
    """A command group whose commands are ``Command`` unless they name their own class."""

    def command(self, *args: Any, cls: Any = None, **kwargs: Any) -> Any:
        return super().command(*args, cls=cls or Command, **kwargs)


class State:
    """The registry from the global ``--registry`` and ``--store`` (None: $ZOO_REGISTRY and
    $ZOO_STORE, else ./registry.db with its store beside it)."""

    registry: Optional[str] = None
    store: Optional[str] = None
    created: "Optional[Location]" = None  # a registry this command made; removed again if the command fails


def _remember_registry(value: Optional[str]) -> Optional[str]:
    if value is not None:
        State.registry = value
    return value


REGISTRY_HELP = ("Registry: a SQLite file (PATH or sqlite:///PATH) or a PostgreSQL database "
                 "(postgresql://USER@HOST/DB, with --store). Default: $ZOO_REGISTRY, else ./registry.db.")
STORE_HELP = ("Blob store: a folder, or S3-compatible object storage (s3://BUCKET/PREFIX; endpoint and "
              "credentials from the AWS environment, a local cache in $ZOO_S3_CACHE bounded by "
              "$ZOO_S3_CACHE_SIZE, default 20G). Required with a PostgreSQL registry (default: $ZOO_STORE); a "
              "SQLite registry keeps a folder beside the file.")


# A subcommand's ``--registry`` reaches State through its callback, so the commands only
# declare the parameter (expose_value=False: typer does not pass it). The root command
# sets State on every run, so nothing carries over between runs in one process. The value
# is parsed as a string: a Path would fold the ``//`` of a URL.
RegistryOpt = typer.Option(None, "--registry", metavar="PATH", help=REGISTRY_HELP, callback=_remember_registry,
                           expose_value=False, parser=str)
JsonOpt = typer.Option(False, "--json", help="Print JSON instead of text.")
EndpointOpt = typer.Option(None, "--endpoint", metavar="URL",
                           help="Hub URL (default: $HF_ENDPOINT, else huggingface.co). The token comes from "
                                "$HF_TOKEN or `hf auth login`.")
ShardSizeOpt = typer.Option(DEFAULT_SHARD_BYTES, "--shard-size", metavar="BYTES", help="Bytes per output shard.")
# MergeLock's key, for `zoo protect` and the protection `zoo push` makes
KeySeedOpt = typer.Option(None, "--seed", metavar="N",
                          help="MergeLock key seed, for reproducible output (default: 128 random bits; a small seed "
                               "can be guessed).")
MaxCondOpt = typer.Option(None, "--max-cond", metavar="X",
                          help="Bound on each MergeLock transform's condition number (default 1000 for float32, 30 "
                               "for bf16/fp16).")


def registry_location() -> "Location":
    """Where the command's registry is (it need not exist yet)."""
    from zoo.registry.paths import locate

    return locate(State.registry, State.store)


def open_registry(create: bool = False) -> "Registry":
    from zoo.registry import Registry

    where = registry_location()
    new = create and where.file is not None and not where.file.exists()
    reg = Registry(where, create=create)
    if new:
        State.created = reg.location
    return reg


def registry_if_any() -> "Registry | None":
    """The registry if there is one (to resolve names), else None (paths only). A registry
    on a server is named on purpose, so it is opened (and a missing one is an error)."""
    where = registry_location()
    return open_registry() if where.on_server or (where.file is not None and where.file.exists()) else None


def registry_for(out: Optional[str]) -> "Registry | None":
    """For a command that makes a model: the registry to register ``out`` in (created if
    needed), or without ``out`` the registry if there is one, to resolve names."""
    return open_registry(create=True) if out is not None else registry_if_any()
