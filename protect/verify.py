"""Proof that a protected model computes what its source does.

Both folders are loaded with ``transformers`` (the class named in ``config.json``'s
``architectures``) and run in float32 on the same seeded multi-token input: with one
token every QK transform looks exact, even one that RoPE breaks (RoPE rotates q and k by position). Float32
checkpoints must agree to a relative logit error of 1e-4 with the same top-1 at every
position; bf16 and fp16 checkpoints are re-rounded by the lock, so they are gated on
the KL divergence between the two output distributions instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from zoo.errors import ZooError

SEQ_LEN = 16
BATCH = 2
REL_TOL = 1e-4  # float32 checkpoints: max |Δ logit| / max |logit|
KL_TOL = 1e-3  # bf16 / fp16 checkpoints: mean KL(p_source ‖ p_protected), nats
OUTPUTS = ("logits", "logits_per_image", "last_hidden_state")  # the first one present is compared


def load(folder: Path) -> torch.nn.Module:
    """The model class the checkpoint names (else ``AutoModel``), in float32, eval mode."""
    import transformers

    cfg = json.loads((folder / "config.json").read_text())
    names = cfg.get("architectures") or []
    cls = getattr(transformers, names[0], None) if names else None
    try:
        model = (cls or transformers.AutoModel).from_pretrained(folder, dtype=torch.float32)
    except Exception as e:  # transformers raises many kinds; one line says which
        raise ZooError(f"cannot load {folder} with transformers to verify it: {e}".splitlines()[0]) from None
    return model.eval()


def probe_inputs(cfg: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """A seeded batch of multi-token inputs the architecture accepts."""
    g = torch.Generator().manual_seed(seed)
    mt = cfg.get("model_type")
    text = cfg.get("text_config") or cfg
    vision = cfg.get("vision_config") or cfg
    inputs: dict[str, torch.Tensor] = {}
    if mt in ("vit", "clip", "clip_vision_model"):
        size, ch = int(vision["image_size"]), int(vision.get("num_channels", 3))
        inputs["pixel_values"] = torch.randn(BATCH, ch, size, size, generator=g)
    if mt != "vit" and mt != "clip_vision_model":
        positions = text.get("max_position_embeddings") or text.get("n_positions") or SEQ_LEN
        n = min(SEQ_LEN, int(positions))
        inputs["input_ids"] = torch.randint(0, int(text["vocab_size"]), (BATCH, n), generator=g)
    if mt == "t5":
        inputs["decoder_input_ids"] = torch.randint(0, int(cfg["vocab_size"]), (BATCH, SEQ_LEN), generator=g)
    if mt == "whisper":  # log-mel frames, as many as its encoder takes (two per position), and decoder tokens
        frames = 2 * int(cfg["max_source_positions"])
        inputs = {"input_features": torch.randn(BATCH, int(cfg["num_mel_bins"]), frames, generator=g),
                  "decoder_input_ids": inputs["input_ids"][:, :min(SEQ_LEN, int(cfg["max_target_positions"]))]}
    return inputs


def _primary(out: Any) -> tuple[str, torch.Tensor]:
    for name in OUTPUTS:
        t = getattr(out, name, None)
        if isinstance(t, torch.Tensor):
            return name, t.float()
    raise ZooError("the model returned none of " + ", ".join(OUTPUTS) + "; cannot compare outputs")


def compare(source: Path, protected: Path, dtype: str, conds: dict[str, float] | None = None) -> dict[str, Any]:
    """Run both models on one probe and measure how far the outputs are apart.

    ``dtype`` is the checkpoint's (safetensors name) and picks the gate. The result
    says ``passed`` and, if not, why.
    """
    cfg = json.loads((source / "config.json").read_text())
    inputs = probe_inputs(cfg)
    with torch.no_grad():
        output, ref = _primary(load(source)(**inputs))
        got = _primary(load(protected)(**inputs))[1]
    diff = (ref - got).abs()
    scale = ref.abs().max().item()
    top1 = (ref.argmax(-1) == got.argmax(-1)).float().mean().item()
    logp, logq = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1).mean().item()
    report = {
        "output": output,
        "checkpoint_dtype": dtype, "input_shape": {k: list(v.shape) for k, v in inputs.items()},
        "max_abs_error": diff.max().item(), "max_rel_error": diff.max().item() / scale if scale else math.inf,
        "top1_agreement": top1, "kl": max(kl, 0.0), **(conds or {}),
    }
    if dtype in ("F32", "F64"):
        report["gate"] = f"max_rel_error <= {REL_TOL:g} and top1_agreement == 1"
        report["passed"] = report["max_rel_error"] <= REL_TOL and top1 == 1.0
    else:
        report["gate"] = f"kl <= {KL_TOL:g}"
        report["passed"] = report["kl"] <= KL_TOL
    return report
