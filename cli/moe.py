"""``zoo moe``: a Mixtral or Qwen2-MoE model from dense experts of one base (mergekit-moe's YAML)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from zoo.cli import render
from zoo.cli.options import JsonOpt, RegistryOpt, ShardSizeOpt, Typer, registry_for

app = Typer()


@app.command("moe")
def moe(
    config: Path = typer.Argument(..., metavar="CONFIG.yml", help="A mergekit-moe config (YAML)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", metavar="NAME",
                                      help="Register the MoE under this name (kind merged)."),
    out_dir: Optional[Path] = typer.Option(None, "--out-dir", metavar="DIR",
                                           help="Write the MoE to this new folder instead."),
    seed: int = typer.Option(0, "--seed", metavar="N",
                             help="Seed of the random gate modes and of noise_scale (mergekit's --random-seed)."),
    hidden_dtype: str = typer.Option("bfloat16", "--hidden-dtype", metavar="DTYPE",
                                     help="dtype the base runs in for the hidden gate modes (mergekit: bfloat16)."),
    prompts_from_tasks: int = typer.Option(0, "--prompts-from-tasks", metavar="N",
                                           help="An expert without positive_prompts takes the first N prompts of "
                                                "each of its registered generative tasks' pools."),
    allow_all_same: bool = typer.Option(False, "--allow-all-same",
                                        help="Allow every expert to be the same model (only useful if you will "
                                             "train the MoE further)."),
    device: str = typer.Option("auto", "--device", metavar="DEVICE",
                               help="auto | cpu | cuda (where the base runs for the hidden gate modes)."),
    shard_size: int = ShardSizeOpt,
    as_json: bool = JsonOpt,
    registry: Optional[Path] = RegistryOpt,
) -> None:
    """Assemble a mixture of experts from dense fine-tunes of one base, as mergekit-moe does.

    Each expert's MLPs become one expert of every layer; attention, norms and embeddings
    are the base's. The routers start from gate_mode: hidden (the base's hidden states of
    each expert's positive minus negative prompts), cheap_embed (their token embeddings),
    or random. Llama or Mistral experts make a Mixtral model; with one shared_experts
    entry, a Qwen2-MoE model. With --out it is registered with the base and every
    expert as parents and the config as its recipe."""
    from zoo.merge.moe import MoeOptions, build, load

    options = MoeOptions(device=device, seed=seed, hidden_dtype=hidden_dtype, allow_all_same=allow_all_same,
                         shard_bytes=shard_size, prompts_from_tasks=prompts_from_tasks)
    options.check()
    cfg = load(config)
    if not prompts_from_tasks:
        cfg.check(allow_all_same)  # before a registry is created for a command that cannot run
    reg = registry_for(out)
    with render.progress_bars() as progress:
        info = build(cfg, options, out=out, out_dir=out_dir, registry=reg, progress=progress)
    if as_json:
        render.emit_json(info)
        return
    where = info.get("ref") or info["path"]
    shared = f" + {info['shared_experts']} shared" if info["shared_experts"] else ""
    print(f"built {info['architecture']} {where}: {info['experts']} experts{shared} over {info['layers']} layers "
          f"of {info['base']}, {info['experts_per_token']} per token, routers from {info['gate_mode']}, "
          f"{info['bytes']} bytes")
    if info["degenerate_layers"]:
        print(f"warning: the router rows of layer(s) {', '.join(map(str, info['degenerate_layers']))} are nearly "
              "parallel; some experts will rarely be chosen (make the prompts more distinct)")
