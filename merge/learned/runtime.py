"""Running a merge candidate: the base's architecture, built once with ``transformers``,
called through ``torch.func.functional_call`` with the merged body and one task's head.
No module is copied per task or per step."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.func import functional_call

from zoo.checkpoints.reader import Checkpoint
from zoo.errors import ZooError

from zoo.merge.learned.train import Forward


class Body:
    """The base architecture as a frozen module, and how its parameter names relate to
    the checkpoint's (recent transformers rename some architectures' weights on load)."""

    def __init__(self, module: nn.Module, names: dict[str, str]):
        self.module = module
        self.to_module = names  # checkpoint name -> module name

    def rename(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {self.to_module.get(n, n): t for n, t in tensors.items()}


def build_body(ckpt: Checkpoint, device: torch.device) -> Body:
    """The base model as a frozen module in eval mode (no dropout), weights loaded."""
    import transformers

    folder = _folder(ckpt)
    if folder is None or not (folder / "config.json").is_file():
        raise ZooError("a learned merge runs the model, so the base needs its config.json")
    transformers.utils.logging.disable_progress_bar()
    try:
        config = transformers.AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise ZooError(f"transformers cannot read the base's config.json ({' '.join(str(e).split())[:160]})") from None
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ZooError("the base's config.json names no transformers architecture (architectures: [...])")
    torch.manual_seed(0)
    module = cls(config)
    names = _checkpoint_names(module)
    to_module = {ck: mod for mod, ck in names.items()}
    state = {to_module[n]: ckpt.read_tensor(n) for n in ckpt.tensors if n in to_module}
    lacking = sorted(set(names.values()) - set(ckpt.tensors))
    if lacking:
        raise ZooError(f"the base checkpoint lacks {len(lacking)} weights its config needs, e.g. {lacking[0]}")
    module.load_state_dict(state, strict=False)
    return Body(module.to(device).eval().requires_grad_(False), to_module)


def _checkpoint_names(module: nn.Module) -> dict[str, str]:
    """Module parameter/buffer name -> the name ``save_pretrained`` writes it under.

    Found by saving a copy whose every tensor holds its own index: a renamed tensor
    comes back whole under its checkpoint name. A conversion that splits or fuses
    tensors (no longer a rename) is refused."""
    import tempfile

    from safetensors import safe_open

    state = module.state_dict()
    marked = {n: torch.full_like(t, float(i)) if t.is_floating_point() else t for i, (n, t) in enumerate(state.items())}
    order = list(state)
    saved = {}
    with tempfile.TemporaryDirectory(prefix="zoo-names-") as tmp:
        module.load_state_dict(marked, strict=False)
        module.save_pretrained(tmp, safe_serialization=True)
        for f in sorted(Path(tmp).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for key in fh.keys():
                    saved[key] = fh.get_tensor(key)
    names = {}
    for key, t in saved.items():
        if not t.is_floating_point() or t.numel() == 0:
            continue
        first = float(t.reshape(-1)[0])
        if not float(first).is_integer() or not torch.all(t == first) or not 0 <= first < len(order):
            raise ZooError(f"transformers converts this architecture's weights on load ({key} is not a plain "
                           "rename); learned merges do not support it yet")
        names[order[int(first)]] = key
    return names


def _folder(ckpt: Checkpoint) -> Path | None:
    files = list(ckpt.files.values())
    return files[0].parent if files else None


class ModelForward:
    """forward(task, merged body, batch) = the module with the merged body and task's
    head (all named as in the checkpoint).

    ``all(params, batches)`` runs the body once over every task's batch together and
    each task's head on its own rows: one pass instead of one per task, the same
    logits up to float rounding (a batched matmul may sum in another order). It works
    where the heads are one submodule whose output is the model's logits, called once
    with the batch first (a classifier on pooled features); elsewhere it returns None
    and the caller runs the tasks one by one."""

    def __init__(self, body: Body, heads: list[dict[str, torch.Tensor]]):
        self.body = body
        self.heads = [body.rename(h) for h in heads]
        self.head_name = _head_module(body.module, self.heads)
        self.shared = self.head_name is not None or not any(self.heads)
        # a causal LM would build a key/value cache on every call; nothing reads it
        self.extra = {"use_cache": False} if _takes(body.module, "use_cache") else {}

    @property
    def one_model(self) -> bool:
        """Whether every task runs the same model (no task heads: a causal LM)."""
        return not any(self.heads)

    def __call__(self, task: int, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(self.body.module, {**self.body.rename(params), **self.heads[task]}, args=(),
                              kwargs={**batch, **self.extra}, strict=False)
        return _logits(out)

    def all(self, params: dict[str, torch.Tensor], batches: list[dict[str, torch.Tensor]],
            tasks: list[int] | None = None) -> list[torch.Tensor] | None:
        """Task ``tasks[i]``'s logits on ``batches[i]`` (tasks: 0, 1, ... by default)."""
        tasks = list(range(len(batches))) if tasks is None else tasks
        if not self.shared or not _stackable(batches):
            return None
        sizes = [len(next(iter(b.values()))) for b in batches]
        joint = {**{k: torch.cat([b[k] for b in batches]) for k in batches[0]}, **self.extra}
        renamed = self.body.rename(params)
        if self.head_name is None:  # no heads: one model for every task
            out = _logits(functional_call(self.body.module, renamed, args=(), kwargs=joint, strict=False))
            return list(out.split(sizes))
        head = self.body.module.get_submodule(self.head_name)
        prefix = self.head_name + "."
        per_task = [{n[len(prefix):]: t for n, t in self.heads[i].items()} for i in tasks]
        seen: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        busy = [False]

        def split_heads(module, args, kwargs, output):
            if busy[0]:
                return None
            if seen or not args or not isinstance(args[0], torch.Tensor) or args[0].shape[0] != sum(sizes):
                seen.append((output, []))  # not the one call on the joint batch: give up below
                return None
            busy[0] = True
            try:
                outs = [functional_call(module, per_task[t], args=(chunk, *args[1:]), kwargs=kwargs, strict=False)
                        for t, chunk in enumerate(args[0].split(sizes))]
            finally:
                busy[0] = False
            seen.append((output, outs))
            return None

        handle = head.register_forward_hook(split_heads, with_kwargs=True)
        try:
            out = functional_call(self.body.module, renamed, args=(), kwargs=joint, strict=False)
        finally:
            handle.remove()
        # the heads' outputs are the logits only if the model returned the head's output as is
        if len(seen) != 1 or not seen[0][1] or _logits(out) is not seen[0][0]:
            self.shared = False
            return None
        return seen[0][1]


def make_forward(body: Body, heads: list[dict[str, torch.Tensor]]) -> ModelForward:
    """forward(task, merged body, batch): the module with the merged body and task's head."""
    return ModelForward(body, heads)


def _takes(module: nn.Module, name: str) -> bool:
    import inspect

    try:
        return name in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


def _logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0]


def _head_module(module: nn.Module, heads: list[dict[str, torch.Tensor]]) -> str | None:
    """The one submodule every task's head tensors belong to, with the same tensor names
    in each head and all of that submodule's parameters; None otherwise."""
    if not heads or not all(heads):
        return None
    names = set(heads[0])
    if any(set(h) != names for h in heads):
        return None
    paths = [n.split(".")[:-1] for n in names]
    common = paths[0]
    for p in paths[1:]:
        while p[:len(common)] != common:
            common = common[:-1]
    if not common:
        return None
    owner = ".".join(common)
    try:
        sub = module.get_submodule(owner)
    except AttributeError:
        return None
    own = {f"{owner}.{n}" for n, _ in sub.named_parameters()}
    return owner if own == names else None


def _stackable(batches: list[dict[str, torch.Tensor]]) -> bool:
    """Whether the batches concatenate: the same inputs, the same shapes but the first."""
    first = batches[0]
    return all(set(b) == set(first) and all(b[k].shape[1:] == first[k].shape[1:] and b[k].dtype == first[k].dtype
                                            and b[k].device == first[k].device for k in first) for b in batches)
