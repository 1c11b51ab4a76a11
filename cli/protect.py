"""MergeLock's commands: protect a model, unlock it with its key, move keys between machines."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from zoo.cli import render
from zoo.cli.options import JsonOpt, KeySeedOpt, MaxCondOpt, RegistryOpt, ShardSizeOpt, Typer, open_registry, \
    registry_for

app = Typer()
key_app = Typer(no_args_is_help=True, help="Move protection keys between machines.")


@app.command()
def protect(
    source: str = typer.Argument(..., metavar="MODEL", help="The model to protect (registry name or model folder)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="NAME",
                                      help="Register the protected model under this name."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", metavar="DIR",
                                           help="Write it to this new folder instead."),
    key_file: Optional[Path] = typer.Option(None, "--key-file", metavar="PATH",
                                            help="Where to write the key (default: registry.keys/NAME@1.key)."),
    seed: Optional[int] = KeySeedOpt,
    max_cond: Optional[float] = MaxCondOpt,
    verify: bool = typer.Option(False, "--verify", help="Run both models with transformers and refuse a result "
                                                        "whose outputs differ past the tolerance."),
    shard_size: int = ShardSizeOpt,
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Make a model unmergeable without changing what it computes (MergeLock)."""
    import zoo.protect as protect_api

    reg = registry_for(out)
    with render.progress_bars() as progress:
        info = protect_api.protect(source, out, registry=reg, out_dir=out_dir, seed=seed, max_cond=max_cond,
                                   key_file=key_file, verify=verify, shard_bytes=shard_size, progress=progress)
    if as_json:
        render.emit_json(info)
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
    source: str = typer.Argument(..., metavar="MODEL", help="The protected model (registry name or model folder)."),
    key: Optional[Path] = typer.Option(None, "--key", metavar="PATH", help="Key file (default: the registry's key)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="NAME",
                                      help="Register the restored model under this name."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", metavar="DIR",
                                           help="Write it to this new folder instead."),
    kind: Optional[str] = typer.Option(None, "--kind", metavar="KIND",
                                       help="Kind to register (default: the source's original)."),
    shard_size: int = ShardSizeOpt,
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Restore a protected model's original weights with its key."""
    import zoo.protect as protect_api

    reg = registry_for(out)
    with render.progress_bars() as progress:
        info = protect_api.unlock(source, out, registry=reg, out_dir=out_dir, key_file=key, kind=kind,
                                  shard_bytes=shard_size, progress=progress)
    if as_json:
        render.emit_json(info)
        return
    u = info["unlock"]
    err = (f"; largest relative error against {u['compared_with']}: {u['max_rel_error']:.2e} ({u['dtype']})"
           if u.get("compared_with") else "")
    print(f"unlocked {source} into {info.get('ref') or info['path']} ({u['tensors_transformed']} tensors){err}")


@key_app.command("export")
def key_export(name: str = typer.Argument(..., metavar="MODEL", help="The protected model."),
               out: Optional[Path] = typer.Option(None, "--out", "-o", metavar="PATH",
                                                  help="Key file (default: NAME@V.key)."),
               as_json: bool = JsonOpt, registry: Optional[Path] = RegistryOpt) -> None:
    """Write a protected model's key from the registry to a key file (mode 0600)."""
    import zoo.protect as protect_api

    path = protect_api.export_key(open_registry(), name, out)
    if as_json:
        render.emit_json({"model": name, "key_file": str(path)})
    else:
        print(f"wrote the key of {name} to {path} (mode 0600)")


@key_app.command("import")
def key_import(file: Path = typer.Argument(..., metavar="PATH",
                                           help="A key file from `zoo key export` or `zoo protect`."),
               model: Optional[str] = typer.Option(None, "--model", "-m", metavar="MODEL",
                                                   help="The protected model (default: the one the file names)."),
               replace: bool = typer.Option(False, "--replace", help="Replace a different stored key."),
               as_json: bool = JsonOpt, registry: Optional[Path] = RegistryOpt) -> None:
    """Store a key file's key in the registry, for the protected model it belongs to."""
    import zoo.protect as protect_api

    info = protect_api.import_key(open_registry(), file, model, replace=replace)
    if as_json:
        render.emit_json(info)
    else:
        print(f"stored key {info['key_id']} for {info['model']}")
