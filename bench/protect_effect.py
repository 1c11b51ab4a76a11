"""Benchmark: does MergeLock break merging for the decoder families?

Per causal-LM family: a tiny seeded base (2 layers, hidden 64, 4 heads) pre-trained
briefly to repeat each token it reads, then two experts fine-tuned from it on tasks
whose skill runs through attention: A outputs the previous token, B the token two back
(a marker token at position 0 says which). The experts are merged by task arithmetic
(Ilharco et al., arXiv:2212.04089), base + λ(τ_A + τ_B), with λ chosen on a validation
split (never on the test split), once with A plain and once with A protected by
MergeLock (default bound). Reported per family: each merge's test accuracy on both
tasks and the share of the plain merge's gain over the base that protection removes.

llama carries the full QK transform; qwen3 (QK-norm) only the restricted one, which
the same tasks compare directly. Because the VO transform alone breaks these merges,
families with separate q/k/v/o_proj are also measured with only one branch locked
(``branch_only``). Float32, one seed per family; about 20 s of CPU per family. Results go to bench/results/protect_effect.json.

    .venv/bin/python bench/protect_effect.py [--families llama,qwen3,...]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import transformers as T
from common import save

from zoo.errors import ZooError
from zoo.protect import protect

V, L, B = 32, 16, 64  # vocabulary, sequence length, batch
LAMBDAS = (0.3, 0.5, 0.7, 1.0)
VAL_SEED, TEST_SEED = 777, 999
BASE_STEPS, EXPERT_STEPS = 400, 400

# Shared by every family: ids 0-2 are special, so every config names them.
_IDS = dict(vocab_size=V, pad_token_id=0, bos_token_id=1, eos_token_id=2)


FAMILIES: dict[str, Callable[[], T.PreTrainedModel]] = {
    "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, **_IDS)),
    "qwen3": lambda: T.Qwen3ForCausalLM(T.Qwen3Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, max_position_embeddings=64, **_IDS)),
    "mixtral": lambda: T.MixtralForCausalLM(T.MixtralConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64, **_IDS)),
    "gpt_neox": lambda: T.GPTNeoXForCausalLM(T.GPTNeoXConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, rotary_pct=0.25,
        max_position_embeddings=64, **_IDS)),
    "gemma2": lambda: T.Gemma2ForCausalLM(T.Gemma2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, max_position_embeddings=64, sliding_window=8, **_IDS)),
    "phi3": lambda: T.Phi3ForCausalLM(T.Phi3Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=128, max_position_embeddings=64, original_max_position_embeddings=64, **_IDS)),
    "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, **_IDS)),
    "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(
        hidden_size=64, n_layer=2, n_head=4, **_IDS)),
    "opt": lambda: T.OPTForCausalLM(T.OPTConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128, word_embed_proj_dim=64,
        max_position_embeddings=64, **_IDS)),
}
REFERENCE, RESTRICTED = "llama", "qwen3"


def batch(task: str, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and per-position targets. ``copy``: the token just read (the base's
    pre-training); ``A``: the previous token; ``B``: the token two back. Position 0 is
    the marker (1 for A, 2 for B; either for copy), so one model can hold both skills."""
    x = torch.randint(3, V, (B, L), generator=g)
    x[:, 0] = {"copy": int(torch.randint(1, 3, (1,), generator=g)), "A": 1, "B": 2}[task]
    y = torch.full_like(x, -100)
    if task == "copy":
        y[:, 1:] = x[:, 1:]
    elif task == "A":
        y[:, 2:] = x[:, 1:-1]
    else:
        y[:, 3:] = x[:, 1:-2]
    return x, y


def _loss(model: T.PreTrainedModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(input_ids=x).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train(model: T.PreTrainedModel, task: str, steps: int, lr: float, seed: int) -> T.PreTrainedModel:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = _loss(model, *batch(task, g))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def accuracy(model: T.PreTrainedModel, task: str, seed: int, n: int = 8) -> float:
    g = torch.Generator().manual_seed(seed)
    hit = tot = 0
    with torch.no_grad():
        for _ in range(n):
            x, y = batch(task, g)
            m = y != -100
            hit += int((model(input_ids=x).logits.argmax(-1)[m] == y[m]).sum())
            tot += int(m.sum())
    return hit / tot


def _state(model: T.PreTrainedModel) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@dataclass
class Merge:
    """One task-arithmetic merge at the λ that the validation split chose."""

    lam: float
    val: float  # mean validation accuracy over A and B at that λ
    a: float  # test accuracy, task A
    b: float  # test accuracy, task B


def best_merge(load: Callable[[], T.PreTrainedModel], base: dict[str, torch.Tensor],
               a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> Merge:
    """base + λ(τ_A + τ_B) for each λ; keep the one best on validation, test it."""
    best: tuple[float, float, T.PreTrainedModel] | None = None
    for lam in LAMBDAS:
        merged = {k: base[k] + lam * ((a[k] - base[k]) + (b[k] - base[k])) if base[k].is_floating_point()
                  else base[k] for k in base}
        model = load()
        model.load_state_dict(merged)
        val = (accuracy(model, "A", VAL_SEED) + accuracy(model, "B", VAL_SEED)) / 2
        if best is None or val > best[1]:
            best = (lam, val, model)
    lam, val, model = best
    return Merge(lam, val, accuracy(model, "A", TEST_SEED), accuracy(model, "B", TEST_SEED))


def _heads(model: T.PreTrainedModel) -> tuple[int, int, int]:
    c = model.config
    d = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads, d


def branch_only(model: T.PreTrainedModel, plain: dict[str, torch.Tensor], locked: dict[str, torch.Tensor],
                branch: str) -> dict[str, torch.Tensor] | None:
    """Expert A with only one of the lock's two branches (``qk`` or ``vo``), for models
    with separate ``q/k/v/o_proj``; None for other layouts.

    The lock also permutes the heads, so the other branch's plain weights are put in the
    lock's head order. That order is read off the locked weights: each query head's
    W_O·W_V product is what the VO transform keeps, so it names the plain head it came
    from. The result computes what A computes (``run_family`` checks it)."""
    layers = sorted({k.rsplit(".self_attn.", 1)[0] for k in plain if k.endswith(".self_attn.q_proj.weight")})
    if not layers:
        return None
    n, kv, d = _heads(model)
    group = n // kv
    out = dict(locked)
    for layer in layers:
        p = f"{layer}.self_attn."
        if p + "v_proj.weight" not in plain or p + "o_proj.weight" not in plain:
            return None

        def vo(sd: dict[str, torch.Tensor], h: int) -> torch.Tensor:
            g = h // group
            return sd[p + "o_proj.weight"][:, h * d:(h + 1) * d] @ sd[p + "v_proj.weight"][g * d:(g + 1) * d]

        perm = torch.tensor([min(range(n), key=lambda j: float((vo(locked, i) - vo(plain, j)).norm()))
                             for i in range(n)])
        perm_kv = perm[::group] // group
        rows_q = torch.cat([torch.arange(h * d, (h + 1) * d) for h in perm])
        rows_kv = torch.cat([torch.arange(g * d, (g + 1) * d) for g in perm_kv])
        if branch == "qk":  # locked q, k and norms; plain v, o in the lock's head order
            for role, rows in (("v_proj", rows_kv),):
                for kind in ("weight", "bias"):
                    if p + f"{role}.{kind}" in plain:
                        out[p + f"{role}.{kind}"] = plain[p + f"{role}.{kind}"][rows]
            out[p + "o_proj.weight"] = plain[p + "o_proj.weight"][:, rows_q]
        else:  # locked v, o; plain q, k (norms too) in the lock's head order
            for role, rows in (("q_proj", rows_q), ("k_proj", rows_kv)):
                for kind in ("weight", "bias"):
                    if p + f"{role}.{kind}" in plain:
                        out[p + f"{role}.{kind}"] = plain[p + f"{role}.{kind}"][rows]
            for norm in ("q_norm.weight", "k_norm.weight"):
                if p + norm in plain:
                    if plain[p + norm].numel() != d:  # per-head norm weights: not handled here
                        return None
                    out[p + norm] = plain[p + norm]
    return out


def removed(base: float, plain: float, protected: float) -> float | None:
    """The share of the plain merge's gain over the base that protection removes (1.0
    or more: all of it; None: the plain merge gained nothing to remove)."""
    gain = plain - base
    return None if gain <= 0 else round((plain - protected) / gain, 3)


def run_family(name: str, workdir: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    torch.manual_seed(0)
    base = train(FAMILIES[name](), "copy", BASE_STEPS, 2e-3, 1)
    d = workdir / name
    base.save_pretrained(d / "base")
    cls = type(base)
    experts = {}
    for i, task in enumerate("AB"):
        experts[task] = train(cls.from_pretrained(d / "base"), task, EXPERT_STEPS, 1e-3, 10 + i)
        experts[task].save_pretrained(d / task)
    protect(str(d / "A"), out_dir=d / "A_locked", seed=123)
    locked = cls.from_pretrained(d / "A_locked").eval()

    def load() -> T.PreTrainedModel:
        return cls.from_pretrained(d / "base").eval()

    b0, sb = _state(base), _state(experts["B"])
    plain = best_merge(load, b0, _state(experts["A"]), sb)
    prot = best_merge(load, b0, _state(locked), sb)
    branches = {}
    for br in ("qk", "vo"):
        sa = branch_only(base, _state(experts["A"]), _state(locked), br)
        if sa is None:
            continue
        check = load()
        check.load_state_dict(sa)
        m = best_merge(load, b0, sa, sb)
        branches[br] = {"expert_A_with_branch": accuracy(check, "A", TEST_SEED), "merge": asdict(m)}
    acc = {"base": {t: accuracy(base, t, TEST_SEED) for t in "AB"},
           "expert_A": {t: accuracy(experts["A"], t, TEST_SEED) for t in "AB"},
           "expert_B": {t: accuracy(experts["B"], t, TEST_SEED) for t in "AB"},
           "expert_A_protected": {t: accuracy(locked, t, TEST_SEED) for t in "AB"}}
    base_mean = (acc["base"]["A"] + acc["base"]["B"]) / 2
    return {
        "model_type": base.config.model_type,
        "base_copy": accuracy(base, "copy", TEST_SEED),
        "accuracy": acc,
        "merge_plain": asdict(plain),
        "merge_protected": asdict(prot),
        "removed_A": removed(acc["base"]["A"], plain.a, prot.a),
        "removed_B": removed(acc["base"]["B"], plain.b, prot.b),
        "removed_mean": removed(base_mean, (plain.a + plain.b) / 2, (prot.a + prot.b) / 2),
        "branch_only": {br: v | {"removed_A": removed(acc["base"]["A"], plain.a, v["merge"]["a"]),
                                 "removed_B": removed(acc["base"]["B"], plain.b, v["merge"]["b"]),
                                 "removed_mean": removed(base_mean, (plain.a + plain.b) / 2,
                                                         (v["merge"]["a"] + v["merge"]["b"]) / 2)}
                        for br, v in branches.items()},
        "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default=",".join(FAMILIES),
                    help=f"comma-separated, in order (default: {','.join(FAMILIES)})")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    names = [f for f in args.families.split(",") if f]
    unknown = [f for f in names if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown families: {', '.join(unknown)} (known: {', '.join(FAMILIES)})")
    torch.set_num_threads(args.threads)
    T.logging.set_verbosity_error()
    T.logging.disable_progress_bar()
    logging.getLogger("zoo").setLevel(logging.ERROR)
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="zoo-protect-effect-") as tmp:
        for name in names:
            try:
                rows[name] = run_family(name, Path(tmp))
            except ZooError as e:  # MergeLock refused this family: record why, go on
                rows[name] = {"refused": str(e)}
                print(f"{name}: refused: {e}", flush=True)
                continue
            r = rows[name]
            print(f"{name}: base A {r['accuracy']['base']['A']:.3f}, expert A {r['accuracy']['expert_A']['A']:.3f}, "
                  f"merge A plain {r['merge_plain']['a']:.3f} / protected {r['merge_protected']['a']:.3f}, "
                  f"removed {r['removed_A']} ({r['seconds']} s)", flush=True)
    out: dict[str, Any] = {
        "setup": {"vocab": V, "seq_len": L, "batch": B, "base_steps": BASE_STEPS, "expert_steps": EXPERT_STEPS,
                  "lambdas": list(LAMBDAS), "chance": 1 / (V - 3), "dtype": "float32",
                  "tasks": "A: previous token, B: token two back; base: the token just read"},
        "families": rows,
    }
    if REFERENCE in rows and RESTRICTED in rows:
        out["restricted_vs_full"] = {
            f"{br}_removed_{m}_{which}": (rows[fam] if br == "lock" else rows[fam].get("branch_only", {}).get(br, {})
                                          ).get(f"removed_{m}")
            for br in ("lock", "qk", "vo") for m in ("A", "mean")
            for which, fam in (("full", REFERENCE), ("restricted", RESTRICTED))}
    save("protect_effect", out)


if __name__ == "__main__":
    main()
