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


def make_forward(body: Body, heads: list[dict[str, torch.Tensor]]) -> Forward:
    """forward(task, merged body, batch) = the module with the merged body and task's
    head (all named as in the checkpoint)."""
    heads = [body.rename(h) for h in heads]

    def forward(task: int, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = functional_call(body.module, {**body.rename(params), **heads[task]}, args=(), kwargs=batch,
                              strict=False)
        return out.logits if hasattr(out, "logits") else out[0]
    return forward
