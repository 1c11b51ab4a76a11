"""``zoo extract-lora``: an expert's task vector as a PEFT LoRA adapter (truncated SVD)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from zoo.cli import render
from zoo.cli.options import JsonOpt, RegistryOpt, Typer, registry_for

app = Typer()


@app.command("extract-lora")
def extract_lora(
    expert: str = typer.Argument(..., metavar="EXPERT", help="The fine-tuned model (registry name or folder)."),
    rank: int = typer.Option(..., "--rank", "-r", metavar="R",
                             help="Most singular triplets kept per module (mergekit's --max-rank)."),
    base: Optional[str] = typer.Option(None, "--base", "-b", metavar="MODEL",
                                       help="Base model (default: the expert's registered base)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="NAME",
                                      help="Register the adapter under this name (kind adapter)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", metavar="DIR",
                                           help="Write the adapter to this new folder instead."),
    distribute_scale: bool = typer.Option(True, "--distribute-scale/--no-distribute-scale",
                                          help="sqrt(S) on both factors; with --no-distribute-scale, S goes on A."),
    sv_epsilon: float = typer.Option(0.0, "--sv-epsilon", metavar="EPS",
                                     help="Also drop singular values at or below EPS (0: keep R)."),
    include: list[str] = typer.Option([], "--include", "-i", metavar="REGEX",
                                      help="Decompose only modules matching one of these (repeatable)."),
    exclude: list[str] = typer.Option([], "--exclude", "-e", metavar="REGEX",
                                      help="Never decompose modules matching one of these (repeatable)."),
    embed_lora: bool = typer.Option(False, "--embed-lora/--no-embed-lora",
                                    help="Decompose embeddings and lm_head too, instead of saving them at full "
                                         "rank."),
    save_module: list[str] = typer.Option([], "--save-module", metavar="MODULE",
                                          help="Save this module at full rank (modules_to_save; repeatable)."),
    skip_undecomposable: bool = typer.Option(False, "--skip-undecomposable",
                                             help="Leave out modules that cannot be decomposed (norms, "
                                                  "convolutions) instead of saving them at full rank."),
    device: str = typer.Option("auto", "--device", metavar="DEVICE", help="auto | cpu | cuda (where the SVDs run)."),
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Extract a LoRA adapter from an expert: each linear weight's task vector (expert minus
    base) cut to its top R singular triplets, as mergekit-extract-lora does.

    Writes adapter_config.json and adapter_model.safetensors (PEFT's layout); with
    --out the adapter is registered with the expert and the base as parents and each
    module's retained energy (kept sigma^2 / all sigma^2) in its lineage and card."""
    from zoo.merge.extract_lora import ExtractOptions, extract

    options = ExtractOptions(rank=rank, distribute_scale=distribute_scale, sv_epsilon=sv_epsilon,
                             include=tuple(include), exclude=tuple(exclude), embed_lora=embed_lora,
                             save_modules=tuple(save_module), skip_undecomposable=skip_undecomposable)
    options.check()  # before a registry is created for a command that cannot run
    reg = registry_for(out)
    with render.progress_bars() as progress:
        info = extract(expert, options, base=base, out=out, out_dir=out_dir, registry=reg, device=device,
                       progress=progress)
    if as_json:
        render.emit_json(info)
        return
    where = info.get("ref") or info["path"]
    print(f"extracted {info['expert']} (base {info['base']}) into {where}: {info['decomposed']} modules at rank "
          f"<= {info['rank']}, retained energy mean {info['energy_mean']:.4f} (min {info['energy_min']:.4f}), "
          f"{info['adapter_bytes']} bytes")
    if info["modules_to_save"]:
        print(f"saved at full rank: {', '.join(info['modules_to_save'])}")
    if info["dropped"]:
        print(f"not carried: {len(info['dropped'])} tensor(s), e.g. {next(iter(info['dropped']))} "
              f"({next(iter(info['dropped'].values()))})")
