"""``zoo extract-lora``: LoRA factors by truncated SVD of an expert's task vector.

Checked here: the factors' algebra; the adapter applied by zoo's own LoRA reader (a
merge of the adapter onto its base) equals the base plus the truncated task vector, and
at full rank the expert; mergekit's rules for what is decomposed, saved or left out;
registration as an ``adapter`` with its lineage; one-line errors. Side by side with the
peers: mergekit-extract-lora on the same expert (its own venv), and PEFT loading zoo's
adapter and merging it (``merge_and_unload``); both skip with the reason when missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from zoo import merge
from zoo.checkpoints.reader import open_checkpoint
from zoo.errors import ZooError
from zoo.merge.extract_lora import ExtractOptions, extract, factorize, plan_extraction

from tests.conftest import expert_family, llama, lora_adapter, perturbed_expert, vit

MERGEKIT_VENV = Path(os.environ.get("ZOO_MERGEKIT_VENV", "/work/bench-env/mergekit-venv"))


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny float32 LLaMA base and one expert (the base plus seeded noise)."""
    base, experts = expert_family(tmp_path_factory.mktemp("family"), n=1, dtype=torch.float32)
    return base, experts[0]


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _truncated(delta: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def _applied_by_zoo(adapter: Path, base: Path, out: Path) -> dict[str, torch.Tensor]:
    """base + scale * B @ A and the saved modules, through zoo's own LoRA reader and merge."""
    merge.run(merge.from_cli("task_arithmetic", str(base), [str(adapter)], ["weight=1"]), out_dir=out)
    return _tensors(out)


# -- the factors -------------------------------------------------------------------------

def test_factors_are_the_truncated_svd():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(24, 16, generator=g, dtype=torch.float64)
    full = factorize(delta, 100)
    assert full.rank == 16 and full.energy == pytest.approx(1.0)
    assert torch.allclose(full.b @ full.a, delta, atol=1e-10)
    f = factorize(delta, 5)
    s = torch.linalg.svdvals(delta)
    assert f.a.shape == (5, 16) and f.b.shape == (24, 5)
    assert f.energy == pytest.approx(float(s[:5].square().sum() / s.square().sum()))
    assert torch.allclose(f.b @ f.a, _truncated(delta, 5), atol=1e-10)
    # distribute_scale: sqrt(S) on both factors; without it, S on A and B orthonormal
    assert torch.allclose(f.a.norm(dim=1), s[:5].sqrt(), atol=1e-10)
    nd = factorize(delta, 5, distribute_scale=False)
    assert torch.allclose(nd.b.T @ nd.b, torch.eye(5, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(nd.b @ nd.a, f.b @ f.a, atol=1e-10)
    # sv_epsilon drops the small singular values too
    assert factorize(delta, 16, sv_epsilon=float(s[3]) + 1e-9).rank == 3
    zero = factorize(torch.zeros(4, 3), 2)
    assert zero.energy == 1.0 and not zero.a.any() and not zero.b.any()


# -- the adapter, applied ----------------------------------------------------------------

@pytest.mark.parametrize("rank", [4, 32])
def test_adapter_applied_is_base_plus_truncated_delta(family, tmp_path, rank):
    """Rank 4: base + truncated Delta on every linear weight; rank 32 (full for the tiny
    model's 32 x 64 matrices): the expert itself."""
    base, expert = family
    info = extract(str(expert), ExtractOptions(rank=rank), base=str(base), out_dir=tmp_path / "ad", device="cpu")
    assert info["path"] == str(tmp_path / "ad")
    assert sorted(p.name for p in (tmp_path / "ad").iterdir()) == ["README.md", "adapter_config.json",
                                                                    "adapter_model.safetensors"]
    got = _applied_by_zoo(tmp_path / "ad", base, tmp_path / "applied")
    b, e = _tensors(base), _tensors(expert)
    for name, w in got.items():
        if name.endswith("proj.weight"):
            want = (b[name].double() + _truncated(e[name].double() - b[name].double(), rank)).float()
            assert torch.allclose(w, want, atol=1e-5), name
            if rank == 32:
                assert torch.allclose(w, e[name], atol=1e-5), name
        else:  # embeddings, lm_head and norms are saved at full rank
            assert torch.equal(w, e[name]), name
    energies = [m["energy"] for m in info["modules"].values()]
    assert (all(x == pytest.approx(1.0) for x in energies) if rank == 32 else all(0 < x < 1 for x in energies))


def test_plan_follows_mergekit_rules_on_a_vit(tmp_path):
    """A ViT classifier: linear layers decomposed (their bias change reported, not
    carried), norms, the patch convolution and the embeddings' own parameters saved at
    full rank, the expert's head saved as it is (its shape differs from the base's)."""
    base = vit(tmp_path / "base", 10, seed=0)
    expert = perturbed_expert(base, tmp_path / "e", 3, seed=5)
    plan = plan_extraction(open_checkpoint(expert), ExtractOptions(rank=4))
    targets = {t.module for t in plan.targets}
    assert "vit.encoder.layer.0.attention.attention.query" in targets
    assert "vit.encoder.layer.1.output.dense" in targets
    assert not any(t.embedding for t in plan.targets)
    assert set(plan.save_keys) >= {"classifier", "embeddings", "layernorm_before", "layernorm_after", "layernorm"}
    assert "classifier.weight" in plan.saved and "vit.embeddings.cls_token" in plan.saved
    assert "vit.embeddings.patch_embeddings.projection.weight" in plan.saved
    assert all(n.endswith(".bias") and n[:-len(".bias")] in targets for n in plan.dropped)
    skip = plan_extraction(open_checkpoint(expert), ExtractOptions(rank=4, skip_undecomposable=True))
    assert set(skip.save_keys) == {"classifier"}
    assert skip.dropped["vit.layernorm.weight"].startswith("skipped")
    info = extract(str(expert), ExtractOptions(rank=64), base=str(base), out_dir=tmp_path / "ad", device="cpu")
    assert info["dropped_tensors"] == len(plan.dropped) and info["energy_min"] == pytest.approx(1.0)


def test_options_choose_and_shape_the_modules(family, tmp_path):
    base, expert = family
    e = open_checkpoint(expert)
    only_attn = plan_extraction(e, ExtractOptions(rank=4, include=("self_attn",), exclude=(r"\.o_proj",)))
    assert {t.module.rsplit(".", 1)[1] for t in only_attn.targets} == {"q_proj", "k_proj", "v_proj"}
    assert only_attn.dropped["model.layers.0.mlp.up_proj.weight"] == "not chosen by --include/--exclude"
    saved = plan_extraction(e, ExtractOptions(rank=4, save_modules=("up_proj",)))
    assert "model.layers.1.mlp.up_proj.weight" in saved.saved and "up_proj" in saved.save_keys
    embed = plan_extraction(e, ExtractOptions(rank=4, embed_lora=True))
    kinds = {t.module: t.embedding for t in embed.targets}
    assert kinds["model.embed_tokens"] is True and kinds["lm_head"] is False
    assert "embed_tokens" not in embed.save_keys

    info = extract(str(expert), ExtractOptions(rank=8, embed_lora=True, sv_epsilon=0.0), base=str(base),
                   out_dir=tmp_path / "emb", device="cpu")
    t = _tensors(tmp_path / "emb")
    assert t["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (8, 128)  # [r, vocab]
    assert t["base_model.model.model.embed_tokens.lora_embedding_B"].shape == (32, 8)  # [dim, r]
    got = _applied_by_zoo(tmp_path / "emb", base, tmp_path / "applied")
    d = _tensors(expert)["model.embed_tokens.weight"] - _tensors(base)["model.embed_tokens.weight"]
    want = _tensors(base)["model.embed_tokens.weight"].double() + _truncated(d.T.double(), 8).T
    assert torch.allclose(got["model.embed_tokens.weight"], want.float(), atol=1e-5)
    assert info["modules"]["model.embed_tokens"]["rank"] == 8

    # sv_epsilon: ranks differ per module, so the config carries rank_pattern = alpha_pattern
    s = torch.linalg.svdvals((_tensors(expert)["model.layers.0.self_attn.q_proj.weight"]
                              - _tensors(base)["model.layers.0.self_attn.q_proj.weight"]).float())
    info = extract(str(expert), ExtractOptions(rank=32, sv_epsilon=float(s[10])), base=str(base),
                   out_dir=tmp_path / "eps", device="cpu")
    config = json.loads((tmp_path / "eps" / "adapter_config.json").read_text())
    ranks = {m: v["rank"] for m, v in info["modules"].items()}
    assert config["r"] == config["lora_alpha"] == max(ranks.values())
    assert config["rank_pattern"] == config["alpha_pattern"] == {m: r for m, r in ranks.items() if r != config["r"]}
    assert ranks["model.layers.0.self_attn.q_proj"] == 10
    applied = _applied_by_zoo(tmp_path / "eps", base, tmp_path / "applied_eps")
    name = "model.layers.0.self_attn.q_proj.weight"
    want = _tensors(base)[name].double() + _truncated((_tensors(expert)[name] - _tensors(base)[name]).double(), 10)
    assert torch.allclose(applied[name], want.float(), atol=1e-5)


# -- the registry ------------------------------------------------------------------------

def test_registered_adapter_has_its_lineage_and_energy(family, registry, zoo_cli, tmp_path):
    base, expert = family
    registry.add(base, "b", "base")
    registry.add(expert, "e", "expert", base="b", tasks=["chat"])
    code, out, err = zoo_cli("--registry", registry.path, "extract-lora", "e", "--rank", "4", "--out", "e-lora",
                             "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["ref"] == "e-lora@1" and info["expert"] == "e@1" and info["base"] == "b@1"
    shown = registry.show("e-lora")
    assert shown["kind"] == "adapter" and shown["form"] == "adapter" and shown["base"] == "b@1"
    assert shown["tasks"] == ["chat"]
    assert [(p["role"], p["ref"]) for p in shown["parents"]] == [("base", "b@1"), ("expert", "e@1")]
    recipe = shown["recipe"]
    assert recipe["method"] == "extract_lora" and recipe["rank"] == 4
    assert recipe["energy"] == {m: v["energy"] for m, v in info["modules"].items()}
    assert all(0 < v < 1 for v in recipe["energy"].values())
    card = (registry.model_dir("e-lora") / "README.md").read_text()
    assert "base_model_relation: adapter" in card and "| `model.layers.0.self_attn.q_proj` | 4 |" in card
    assert registry.check(["e-lora"])[0].ok
    code, out, err = zoo_cli("--registry", registry.path, "extract-lora", "e", "--rank", "4", "--out-dir",
                             tmp_path / "plain")
    assert code == 0 and "retained energy mean" in out and (tmp_path / "plain" / "adapter_config.json").is_file()


@pytest.mark.parametrize("args, message", [
    (["--rank", "0", "--out-dir", "x"], "--rank must be a positive whole number"),
    (["--rank", "-3", "--out-dir", "x"], "--rank must be a positive whole number"),
    (["--rank", "4"], "give either a registry name (--out) or a folder (--out-dir)"),
    (["--rank", "4", "--out-dir", "x", "--out", "y"], "give either"),
    (["--rank", "4", "--out-dir", "x", "--sv-epsilon", "-1"], "--sv-epsilon must be"),
    (["--rank", "4", "--out-dir", "x", "--include", "("], "--include '(' is not a regular expression"),
    (["--rank", "4", "--out-dir", "x", "--include", "nothing-matches"], "no module of"),
    (["--rank", "4", "--out-dir", "x", "--base", "@wide"], "does not match base"),
    (["--rank", "4", "--out-dir", "x", "--base", "@adapter"], "is a LoRA adapter already"),
    (["--rank", "4", "--out-dir", "x", "--base", "@expert"], "is the base itself"),
    (["--rank", "4", "--out-dir", "x", "--base", "@missing"], "neither a registered model nor a path"),
    (["--rank", "4", "--out", "y"], "needs its base in the registry"),
])
def test_bad_input_is_one_line_and_leaves_nothing(family, tmp_path, zoo_cli, args, message):
    base, expert = family
    places = {"@wide": llama(tmp_path / "wide", vocab=64), "@adapter": lora_adapter(tmp_path / "ad", base),
              "@expert": expert, "@missing": tmp_path / "nope"}
    args = [str(places.get(a, a)) for a in args]
    if "--base" not in args:
        args += ["--base", str(base)]
    code, out, err = zoo_cli("extract-lora", expert, *args)
    assert code == 1 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))


# -- side by side with the peers -----------------------------------------------------------

def _mergekit() -> Path:
    exe = MERGEKIT_VENV / "bin" / "mergekit-extract-lora"
    if not exe.is_file():
        pytest.skip(f"mergekit-extract-lora not found at {exe} (set ZOO_MERGEKIT_VENV to mergekit 0.1.5's venv)")
    return exe


@pytest.mark.parametrize("flags", [[], ["--no-distribute-scale"], ["--embed-lora"], ["-e", "mlp"]])
def test_same_factors_as_mergekit_extract_lora(family, tmp_path, flags):
    exe = _mergekit()
    base, expert = family
    mk = tmp_path / "mk"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([str(exe), "--model", str(expert), "--base-model", str(base), "--out-path", str(mk),
                          "--max-rank", "6", *flags], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    options = ExtractOptions(rank=6, distribute_scale="--no-distribute-scale" not in flags,
                             embed_lora="--embed-lora" in flags, exclude=("mlp",) if "-e" in flags else ())
    extract(str(expert), options, base=str(base), out_dir=tmp_path / "zoo", device="cpu")
    want, got = _tensors(mk), _tensors(tmp_path / "zoo")
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == w.dtype and g.shape == w.shape, name
        if "lora_A" in name or "lora_embedding_A" in name:
            b_name = name.replace("_A", "_B")
            # the products, and the factors up to each singular vector's sign
            assert torch.allclose(got[b_name] @ g, want[b_name] @ w, atol=1e-6), name
            sign = torch.sign((g * w).sum(dim=1))
            assert torch.allclose(g * sign[:, None], w, atol=1e-5), name
            assert torch.allclose(got[b_name] * sign, want[b_name], atol=1e-5), b_name
        elif "lora_B" not in name and "lora_embedding_B" not in name:
            assert torch.equal(g, w), name  # saved at full rank: the expert's tensor
    mk_cfg = json.loads((mk / "adapter_config.json").read_text())
    cfg = json.loads((tmp_path / "zoo" / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "peft_type", "use_rslora", "task_type"):
        assert cfg[key] == mk_cfg[key], key
    assert set(cfg["modules_to_save"] or []) == set(mk_cfg["modules_to_save"])
    assert set(cfg["target_modules"]) == set(mk_cfg["target_modules"])


PEFT_CHECK = r"""
import json, sys, torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
base, adapter, want = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
merged = model.merge_and_unload().state_dict()
want = load_file(want)
print(json.dumps({k: float((merged[k].float() - w.float()).abs().max()) for k, w in want.items()}))
"""


def _peft_python() -> str:
    try:
        import peft  # noqa: F401

        return sys.executable
    except ImportError:
        exe = MERGEKIT_VENV / "bin" / "python"
        probe = subprocess.run([str(exe), "-c", "import peft"], capture_output=True) if exe.is_file() else None
        if probe is None or probe.returncode:
            pytest.skip("PEFT is not installed here nor in the mergekit venv (ZOO_MERGEKIT_VENV)")
        return str(exe)


@pytest.mark.parametrize("rank", [4, 32])
def test_peft_merges_zoos_adapter_into_base_plus_truncated_delta(family, tmp_path, rank):
    """PeftModel.from_pretrained on the base, then merge_and_unload: base + truncated
    Delta on every linear weight (rank 4), the expert itself at full rank (32)."""
    python = _peft_python()
    base, expert = family
    extract(str(expert), ExtractOptions(rank=rank), base=str(base), out_dir=tmp_path / "ad", device="cpu")
    b, e = _tensors(base), _tensors(expert)
    want = {n: (b[n].double() + _truncated(e[n].double() - b[n].double(), rank)).float() if n.endswith("proj.weight")
            else e[n] for n in e}
    save_file(want, str(tmp_path / "want.safetensors"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([python, "-c", PEFT_CHECK, str(base), str(tmp_path / "ad"), str(tmp_path / "want.safetensors")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    diffs = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(diffs) == set(want)
    assert max(diffs.values()) < 1e-5, {k: v for k, v in diffs.items() if v >= 1e-5}
