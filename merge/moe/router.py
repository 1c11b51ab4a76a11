"""The routers' initial weights, one row per expert and layer, as mergekit-moe makes
them for each ``gate_mode``.

* ``hidden`` / ``hidden_last``, ``hidden_avg``: the base model runs (with transformers,
  in ``hidden_dtype``, bfloat16 as mergekit) on each expert's positive prompts; the
  residual stream entering each layer, at the last token (or averaged over the tokens),
  averaged over the prompts, minus the same for its negative prompts, normalised. A
  token whose hidden state looks like an expert's prompts then scores highest on that
  expert's row. This is the "hidden" initialisation of mergekit-moe (Goddard et al.,
  arXiv 2403.13257) for sparse upcycling (Komatsuzaki et al., arXiv 2212.05055).
* ``cheap_embed``: the same with the prompts' summed token embeddings, one vector for
  every layer; no forward pass.
* ``random``: standard normal rows; ``uniform_random``: torch.nn.Linear's
  U(-1/sqrt(hidden), 1/sqrt(hidden)). Both drawn from ``seed``, so mergekit-moe run
  with ``--random-seed`` on the same config draws the same rows.

The prompts are tokenised as mergekit does: the base's tokenizer, ``bos_token`` written
in front of each prompt, no other special tokens, padded on the left with the BOS id.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from zoo.errors import ZooError

if TYPE_CHECKING:
    from zoo.checkpoints.reader import Checkpoint
    from zoo.merge.moe.config import ExpertSpec

TOKENIZER_NAMES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
EMBEDDING = "model.embed_tokens.weight"
DEGENERATE_COND = 5.0  # mergekit warns above this condition number of a layer's rows


@dataclass(frozen=True)
class BaseModel:
    """What the gates need of the base: its checkpoint, label, layer count and width."""

    ckpt: "Checkpoint"
    label: str
    num_layers: int
    hidden_size: int
    vocab_size: int


def gate_vectors(mode: str, base: BaseModel, experts: Sequence["ExpertSpec"], *, seed: int = 0,
                 device: torch.device | None = None, hidden_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The router rows, [layers, experts, hidden], for ``experts`` in order."""
    shape = (base.num_layers, len(experts), base.hidden_size)
    if mode == "random":
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if mode == "uniform_random":
        scale = math.sqrt(1.0 / base.hidden_size)
        return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 * scale - scale
    tokenizer = load_tokenizer(base.ckpt, base.label)
    if mode == "cheap_embed":
        embed = base.ckpt.read_tensor(EMBEDDING) if EMBEDDING in base.ckpt.tensors else None
        if embed is None:
            raise ZooError(f"{base.label} has no {EMBEDDING}; gate_mode cheap_embed needs the token embeddings")

        def vector(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return cheap_embedding(embed, batch, base.num_layers)
        return _rows(experts, tokenizer, vector)
    device = device or torch.device("cpu")
    with _transformers_model(base.ckpt, base.label, hidden_dtype, device) as model:
        def vector(batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return hidden_states(model, batch, average=mode == "hidden_avg").cpu()
        return _rows(experts, tokenizer, vector)


def _rows(experts: Sequence["ExpertSpec"], tokenizer: Any,
          vector: Callable[[dict[str, torch.Tensor]], torch.Tensor]) -> torch.Tensor:
    rows = []
    for e in experts:
        v = vector(tokenize(tokenizer, e.positive_prompts))
        if e.negative_prompts:
            v -= vector(tokenize(tokenizer, e.negative_prompts))
        v /= v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        rows.append(v)
    return torch.stack(rows, dim=0).permute(1, 0, 2)  # [experts, layers, hidden] -> [layers, experts, hidden]


def cheap_embedding(embed: torch.Tensor, batch: dict[str, torch.Tensor], num_layers: int) -> torch.Tensor:
    """The prompts' token embeddings (padding masked out) summed and normalised, [layers, hidden]."""
    h = embed.float()[batch["input_ids"]]  # a row lookup: the same floats as one-hot @ embed
    summed = (h * batch["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return (summed / summed.norm(dim=-1, keepdim=True).clamp(min=1e-8)).repeat(num_layers, 1)


@torch.no_grad()
def hidden_states(model: Any, batch: dict[str, torch.Tensor], average: bool = False) -> torch.Tensor:
    """The residual stream entering each layer (the embeddings, then each layer's output
    but the last), at each prompt's last token or averaged over its positions, then
    averaged over the prompts: [layers, hidden], in the model's dtype."""
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in batch.items()}, output_hidden_states=True, return_dict=True)
    states = torch.stack(out.hidden_states[:-1])  # [layers, batch, seq, hidden]
    states = states.sum(dim=2) / states.shape[2] if average else states[:, :, -1, :]
    return states.sum(dim=1) / states.shape[1]


def tokenize(tokenizer: Any, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    batch = tokenizer([(tokenizer.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
                      add_special_tokens=False)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def load_tokenizer(ckpt: "Checkpoint", label: str) -> Any:
    """The base's tokenizer, set up to pad on the left with its BOS id (mergekit's setup)."""
    files = {n: p for n, p in ckpt.files.items() if n.startswith(("tokenizer", "special_tokens_map", "vocab",
                                                                        "merges", "added_tokens", "chat_template"))}
    if not set(TOKENIZER_NAMES) & set(files):
        raise ZooError(f"{label} has no tokenizer files; the router's prompts need its tokenizer (or use gate_mode: "
                       "random)")
    import transformers

    with linked_folder(files) as folder:
        try:
            tok = transformers.AutoTokenizer.from_pretrained(folder)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise ZooError(f"cannot load the tokenizer of {label}: {' '.join(str(e).split())[:200]}") from None
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    if tok.pad_token_id is None:
        raise ZooError(f"the tokenizer of {label} has neither a BOS nor an EOS token to pad the prompts with")
    return tok


@contextmanager
def _transformers_model(ckpt: "Checkpoint", label: str, dtype: torch.dtype, device: torch.device) -> Iterator[Any]:
    """The base as a transformers causal LM in ``dtype`` on ``device``, for one block."""
    import transformers

    with linked_folder(ckpt.files) as folder:
        verbosity = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()
        try:
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        except Exception as e:  # noqa: BLE001 - transformers raises many kinds
            raise ZooError(f"cannot load {label} with transformers to read its hidden states: "
                           f"{' '.join(str(e).split())[:200]}") from None
        finally:
            transformers.utils.logging.set_verbosity(verbosity)
        yield model.to(device).eval()


@contextmanager
def linked_folder(files: dict[str, Path]) -> Iterator[str]:
    """A temporary folder of symbolic links to a checkpoint's files, as transformers
    wants a folder (a registered model's files live in the blob store)."""
    with tempfile.TemporaryDirectory(prefix="zoo-moe-") as tmp:
        for name, path in files.items():
            target = Path(tmp) / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(Path(path).resolve(), target)
        yield tmp


def degenerate_layers(gates: torch.Tensor, threshold: float = DEGENERATE_COND) -> list[int]:
    """Layers whose rows are nearly parallel (condition number above ``threshold``):
    mergekit's warning that some experts will hardly be chosen."""
    return [i for i in range(gates.shape[0]) if float(torch.linalg.cond(gates[i].float())) > threshold]
