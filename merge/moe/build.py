"""``zoo moe``: a Mixtral or Qwen2-MoE checkpoint assembled from dense experts of one
base, streamed tensor by tensor through zoo's one writer, and registered with the
base and every expert as parents."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zoo.checkpoints.compat import compare
from zoo.checkpoints.prompts import FORMAT as PROMPTS_FORMAT
from zoo.checkpoints.prompts import read_prompts
from zoo.checkpoints.reader import Checkpoint
from zoo.checkpoints.writer import DEFAULT_SHARD_BYTES, OutTensor, ShardWriter, plan_shards, tensor_bytes, write_file
from zoo.errors import IncompatibleModels, ZooError
from zoo.merge.moe import layouts, router
from zoo.merge.moe.config import ExpertSpec, MoeConfig
from zoo.progress import no_progress
from zoo.registry import card
from zoo.registry.destination import Destination
from zoo.registry.records import NewModel
from zoo.registry.resolve import open_model

if TYPE_CHECKING:
    from zoo.progress import ProgressFactory
    from zoo.registry import Registry

METHOD = "moe"
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
                "float64": torch.float64}
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
# The base's files that travel with the MoE: its tokenizer and generation settings.
CARRIED = ("tokenizer", "special_tokens_map", "vocab", "merges", "added_tokens", "chat_template",
           "generation_config")


@dataclass(frozen=True)
class MoeOptions:
    """How zoo runs what the config leaves open."""

    device: str = "auto"  # where the base runs for the hidden gate modes
    seed: int = 0  # random gate modes and noise_scale draw from it (mergekit's --random-seed)
    hidden_dtype: str = "bfloat16"  # the base's dtype for hidden states (mergekit loads it in bfloat16)
    allow_all_same: bool = False  # mergekit's --i-understand-this-is-not-useful-without-training
    shard_bytes: int = DEFAULT_SHARD_BYTES
    # An expert without positive_prompts takes up to this many from each of its registered
    # tasks' prompt pools (0: never; the config's prompts always win).
    prompts_from_tasks: int = 0

    def check(self) -> None:
        if isinstance(self.prompts_from_tasks, bool) or not isinstance(self.prompts_from_tasks, int) \
                or self.prompts_from_tasks < 0:
            raise ZooError(f"--prompts-from-tasks must be a whole number >= 0, not {self.prompts_from_tasks!r}")
        if self.hidden_dtype not in TORCH_DTYPES:
            raise ZooError(f"--hidden-dtype must be one of {', '.join(TORCH_DTYPES)}, not {self.hidden_dtype!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ZooError(f"--seed must be a whole number >= 0, not {self.seed!r}")


@dataclass(frozen=True)
class Input:
    """One model of the config, opened: the base (role ``base``) or an expert."""

    role: str  # base | expert | shared_expert
    label: str  # as the config names it
    ref: str  # the registry's NAME@VERSION, or the label for a folder
    ckpt: Checkpoint
    info: dict[str, Any] | None  # the registry's record (None: a folder)

    @property
    def model_type(self) -> str | None:
        return (self.ckpt.config or {}).get("model_type")


def _open(role: str, label: str, registry: "Registry | None", cache: dict[str, Input]) -> Input:
    if label not in cache:
        ckpt, info = open_model(label, registry)
        if ckpt.form != "model" or not ckpt.config:
            raise ZooError(f"{label} is not a model folder with a config.json (zoo moe takes whole dense models)")
        cache[label] = Input(role, label, (info or {}).get("ref") or label, ckpt, info)
    got = cache[label]
    return Input(role, got.label, got.ref, got.ckpt, got.info)


def open_inputs(config: MoeConfig, registry: "Registry | None") -> list[Input]:
    """The base, then the experts, then the shared experts, each opened once."""
    cache: dict[str, Input] = {}
    return [_open("base", config.base_model, registry, cache),
            *[_open("expert", e.source_model, registry, cache) for e in config.experts],
            *[_open("shared_expert", e.source_model, registry, cache) for e in config.shared_experts]]


def with_task_prompts(config: MoeConfig, registry: "Registry | None", count: int) -> MoeConfig:
    """Each expert without positive_prompts gets the first ``count`` prompts of each of
    its registered tasks' prompt pools (generative tasks, JSONL); the config's own
    prompts are left as they are. The prompts used go into the lineage's config."""
    if count <= 0:
        return config
    if registry is None:
        raise ZooError("--prompts-from-tasks reads the experts' registered tasks; it needs a registry")

    def filled(spec: ExpertSpec) -> ExpertSpec:
        if spec.positive_prompts:
            return spec
        if not registry.has(spec.source_model):
            raise ZooError(f"{spec.source_model} has no positive_prompts and is not registered, so it has no tasks "
                           "to take prompts from")
        pool: list[str] = []
        for task in registry.show(spec.source_model).get("tasks") or []:
            if registry.task(task).get("data_format") == PROMPTS_FORMAT:
                pool += [p.prompt for p in read_prompts(registry.task_data(task))[:count]]
        if not pool:
            raise ZooError(f"{spec.source_model} has no positive_prompts and none of its registered tasks has a "
                           f"prompt pool ({PROMPTS_FORMAT}); give it positive_prompts")
        return dataclasses.replace(spec, positive_prompts=tuple(pool))

    experts, shared = tuple(map(filled, config.experts)), tuple(map(filled, config.shared_experts))
    source = dict(config.source)
    for key, specs in (("experts", experts), ("shared_experts", shared)):
        if specs:
            source[key] = [{**e, "positive_prompts": list(s.positive_prompts)}
                           for e, s in zip(config.source[key], specs)]
    return dataclasses.replace(config, experts=experts, shared_experts=shared, source=source)


def check_inputs(inputs: list[Input]) -> str:
    """Every expert of the base's architecture and shapes; returns that model type."""
    base = inputs[0]
    for inp in inputs[1:]:
        if inp.model_type != base.model_type:
            raise IncompatibleModels(f"{inp.ref} is a {inp.model_type} model but the base {base.ref} is "
                                     f"{base.model_type}; every expert must be a fine-tune of the base")
        report = compare(inp.ckpt, base.ckpt, inp.ref, base.ref, ())
        if not report.ok:
            raise IncompatibleModels(f"{report.one_line()}; every expert must be a fine-tune of the base")
    if base.model_type is None:
        raise ZooError(f"{base.ref}'s config.json has no model_type")
    return base.model_type


def _out_dtype(config: MoeConfig, base_config: Any) -> torch.dtype | None:
    """The config's dtype, else the base's (mergekit's ``select_dtype``)."""
    if config.dtype:
        return TORCH_DTYPES[config.dtype]
    dtype = getattr(base_config, "dtype", None)
    if isinstance(dtype, str):
        dtype = TORCH_DTYPES.get(dtype.removeprefix("torch."))
    return dtype if isinstance(dtype, torch.dtype) else None


def _base_config(ckpt: Checkpoint, label: str) -> Any:
    import transformers

    with router.linked_folder({"config.json": ckpt.files["config.json"]}) as folder:
        try:
            return transformers.AutoConfig.from_pretrained(folder)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise ZooError(f"transformers cannot read {label}'s config.json: {' '.join(str(e).split())[:200]}") \
                from None


def build(config: MoeConfig, options: MoeOptions = MoeOptions(), *, out: str | None = None,
          out_dir: "str | os.PathLike[str] | None" = None, registry: "Registry | None" = None,
          progress: "ProgressFactory | None" = None) -> dict[str, Any]:
    """Build the MoE ``config`` describes. With ``out`` (a name) it is registered as a
    ``merged`` model, its parents the base and every expert, its recipe the config with
    every model pinned; with ``out_dir`` it is written to that new folder. Returns what
    was made: where, the layout, the experts and the gate mode."""
    options.check()
    config = with_task_prompts(config, registry, options.prompts_from_tasks)
    config.check(options.allow_all_same)
    dest = Destination.check(out, out_dir, registry, shard_bytes=options.shard_bytes)
    inputs = open_inputs(config, registry)
    if dest.registers:
        missing = [i.label for i in inputs if i.info is None]
        if missing:
            raise ZooError(f"registering the MoE needs every model of the config in the registry; add "
                           f"{missing[0]} first (zoo add), or write a folder with --out-dir")
    model_type = check_inputs(inputs)
    layout = layouts.choose(config, model_type)
    base = inputs[0]
    base_cfg = _base_config(base.ckpt, base.ref)
    out_dtype = _out_dtype(config, base_cfg)
    plan = layout.plan({n: t.shape for n, t in base.ckpt.tensors.items()}, len(config.experts),
                       len(config.shared_experts))

    from zoo.merge.engine import pick_device

    device = pick_device(options.device)
    base_model = router.BaseModel(base.ckpt, base.ref, base_cfg.num_hidden_layers, base_cfg.hidden_size,
                                  base_cfg.vocab_size)
    gated = config.gated()
    gates = router.gate_vectors(config.gate_mode, base_model, gated, seed=options.seed, device=device,
                                hidden_dtype=TORCH_DTYPES[options.hidden_dtype])
    degenerate = router.degenerate_layers(gates)
    specs = [None, *config.experts, *config.shared_experts]
    progress = progress or no_progress
    with dest.workspace(".moe") as folder:
        digests = _write(plan, inputs, specs, gates, out_dtype, folder, options, progress, dest.label)
        for name, path in sorted(base.ckpt.files.items()):
            if name.startswith(CARRIED) and not name.endswith(".safetensors"):
                digests[name] = write_file(folder / name, path.read_bytes())
        out_cfg = layout.model_config(base_cfg, len(config.experts), config.experts_per_token, out_dtype)
        digests["config.json"] = write_file(folder / "config.json", out_cfg.to_json_string().encode())
        recipe = _recipe(config, inputs, options, layout, degenerate)
        summary = {"architecture": layout.transformers_class, "experts": len(config.experts),
                   "shared_experts": len(config.shared_experts), "experts_per_token": config.experts_per_token,
                   "gate_mode": config.gate_mode, "dtype": str(out_dtype).removeprefix("torch.") if out_dtype else None,
                   "layers": base_cfg.num_hidden_layers, "degenerate_layers": degenerate,
                   "bytes": sum(p.stat().st_size for p in folder.glob("*.safetensors"))}
        digests["README.md"] = write_file(folder / "README.md",
                                          _card(dest.label, inputs, config, summary).encode())
        tasks = sorted({t for i in inputs[1:] for t in ((i.info or {}).get("tasks") or [])})
        kept = dest.keep(NewModel(folder, dest.label, "merged", digests,
                                  parents=[(i.role, i.ref) for i in inputs if i.info is not None],
                                  recipe=recipe, tasks=tasks, metadata={"moe": summary}))
    return {**kept, **summary, "base": base.ref, "expert_refs": [i.ref for i in inputs[1:]]}


def _recipe(config: MoeConfig, inputs: list[Input], options: MoeOptions, layout: layouts.Layout,
            degenerate: list[int]) -> dict[str, Any]:
    """The config as given, with every model pinned to the version used, and zoo's options."""
    refs = iter(i.ref for i in inputs)
    pinned = {**config.source, "base_model": next(refs)}
    for key in ("experts", "shared_experts"):
        if config.source.get(key):
            pinned[key] = [{**e, "source_model": next(refs)} for e in config.source[key]]
    return {"method": METHOD, "architecture": layout.transformers_class, "config": pinned,
            **{k: v for k, v in asdict(options).items() if k != "shard_bytes"}, "degenerate_layers": degenerate}


def _write(plan: list[layouts.Planned], inputs: list[Input], specs: list[Any], gates: torch.Tensor,
           out_dtype: torch.dtype | None, folder: Path, options: MoeOptions, progress: "ProgressFactory",
           label: str) -> dict[str, str]:
    """Stream every planned tensor into the shards, header first: a fused tensor is
    written as its experts' pieces one after another, never held whole."""
    def dtype_of(p: layouts.Planned) -> torch.dtype:
        if out_dtype is not None:
            return out_dtype
        if p.sources:
            return _torch_dtype(inputs[p.sources[0].model].ckpt.tensors[p.sources[0].tensor].dtype)
        return gates.dtype

    entries = [OutTensor(p.name, SAFETENSORS_DTYPES[dtype_of(p)], p.shape) for p in plan]
    advance = progress(f"writing {label}", sum(e.nbytes for e in entries), len(entries))
    writer = ShardWriter(folder, plan_shards(entries, options.shard_bytes))
    try:
        for p, e in zip(plan, entries):
            dtype = dtype_of(p)
            if p.zeros:
                writer.put(tensor_bytes(torch.zeros(p.shape, dtype=dtype)))
            elif p.router is not None:
                layer, first, rows = p.router
                writer.put(tensor_bytes(gates[layer, first:first + rows].to(dtype).contiguous()))
            for s in p.sources:
                inp = inputs[s.model]
                spec = specs[s.model] if inp.role != "base" else None
                noise = spec is not None and spec.noise_scale is not None
                scale = spec is not None and s.residual and spec.residual_scale is not None
                if not noise and not scale and inp.ckpt.tensors[s.tensor].dtype == SAFETENSORS_DTYPES[dtype]:
                    writer.put(inp.ckpt.read_bytes(s.tensor))  # unchanged: the bytes as they are
                    continue
                t = inp.ckpt.read_tensor(s.tensor)
                if noise:
                    g = torch.Generator().manual_seed(_noise_seed(options.seed, s.model, s.tensor))
                    t = t + torch.randn(t.shape, generator=g).to(t.dtype) * spec.noise_scale
                if scale:
                    t = t * spec.residual_scale
                writer.put(tensor_bytes(t.to(dtype)))
            advance(e.nbytes, 1)
    except BaseException:
        writer.abort()
        raise
    return writer.close()


def _noise_seed(seed: int, model: int, tensor: str) -> int:
    """Each tensor's own noise stream, so the result does not depend on write order."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}/{model}/{tensor}".encode()).digest()[:8], "little")


def _torch_dtype(name: str) -> torch.dtype:
    return {v: k for k, v in SAFETENSORS_DTYPES.items()}[name]


def _card(name: str, inputs: list[Input], config: MoeConfig, summary: dict[str, Any]) -> str:
    base = inputs[0]
    front = card.front_matter(list(dict.fromkeys(i.ref for i in inputs)), "merge",
                              ["moe", summary["architecture"].removesuffix("ForCausalLM").lower(), card.TAG,
                               card.MERGE_TAG])
    rows = []
    for i, (inp, spec) in enumerate(zip(inputs[1:], [*config.experts, *config.shared_experts])):
        kind = "shared" if inp.role == "shared_expert" else f"expert {i}"
        prompts = "; ".join(spec.positive_prompts[:3]) + (" ..." if len(spec.positive_prompts) > 3 else "")
        rows.append(f"| {kind} | `{inp.ref}` | {len(spec.positive_prompts)} / {len(spec.negative_prompts)} | "
                    f"{prompts.replace('|', '/')} |")
    routing = {"hidden": "the base's hidden states (last token) of each expert's prompts",
               "hidden_last": "the base's hidden states (last token) of each expert's prompts",
               "hidden_avg": "the base's hidden states (averaged over tokens) of each expert's prompts",
               "cheap_embed": "the summed token embeddings of each expert's prompts",
               "random": "random normal rows", "uniform_random": "random uniform rows"}[config.gate_mode]
    lines = [
        f"A {summary['architecture'].removesuffix('ForCausalLM')} mixture of experts assembled with zoo from dense "
        f"fine-tunes of `{base.ref}`, as mergekit-moe does: each expert's MLPs become one expert of every layer; "
        "attention, norms and embeddings are the base's. "
        f"Routers initialised from {routing}; {summary['experts_per_token']} expert(s) per token. "
        "Untrained routers: fine-tuning them usually helps.", "",
        f"- experts: {summary['experts']}" + (f", shared experts: {summary['shared_experts']}"
                                               if summary["shared_experts"] else ""),
        f"- layers: {summary['layers']}, dtype: {summary['dtype'] or 'as the inputs'}",
    ]
    if summary["degenerate_layers"]:
        lines.append(f"- layers whose router rows are nearly parallel (some experts will rarely be chosen): "
                     f"{', '.join(map(str, summary['degenerate_layers']))}")
    lines += ["", "| slot | model | prompts (+ / -) | e.g. |", "|---|---|---|---|", *rows, ""]
    return card.render(front, name, lines)
