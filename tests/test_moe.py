"""``zoo moe``: a Mixtral or Qwen2-MoE model from dense experts of one base.

Checked here, on tiny seeded Llama experts made from transformers configs (with a
character tokenizer): the output loads in transformers and runs; a Mixtral of copies of
the base computes what the base computes (the experts' layout is right); side by side
with mergekit-moe (its own venv) on the same config, every tensor is equal for each gate
mode, Mixtral and Qwen2-MoE; routing on each task's held-out prompts picks that task's
expert; registration with its parents and pinned config; one-line refusals.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from zoo.merge import moe
from zoo.merge.moe.layouts import natural

from tests.conftest import llama, vit

MERGEKIT_VENV = Path(os.environ.get("ZOO_MERGEKIT_VENV", "/work/bench-env/mergekit-venv"))
# Three tasks whose prompts use disjoint characters, so each expert has its own inputs.
TASKS = {"digits": "0123456789", "lower": "abcdefghijklmnopqrstuvwxyz", "upper": "ABCDEFGHIJKLMNOPQRSTUVWXYZ"}
ROUTING_BAR = 0.9  # top-1 share of each task's tokens that its own expert must get


def prompts(task: str, n: int, seed: int) -> list[str]:
    rng = random.Random(f"{task}/{seed}")
    return ["".join(rng.choice(TASKS[task]) for _ in range(rng.randint(6, 12))) for _ in range(n)]


def tiny_llama(path: Path, seed: int = 0, hidden: int = 64) -> Path:
    """A tiny Llama with the LLM demo zoo's character tokenizer, whose embeddings group
    each task's characters around a direction of their own, as a pre-trained model's
    embeddings group kinds of tokens (a randomly initialised one tells them apart only
    by chance)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from zoo.demo.llm_zoo import BOS, EOS, PAD, save_tokenizer, vocabulary

    torch.manual_seed(seed)
    vocab = vocabulary()
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        for task, chars in TASKS.items():
            direction = torch.randn(hidden) * 0.02
            for c in chars:
                emb[vocab[c]] = direction + 0.5 * emb[vocab[c]]
    model.save_pretrained(path)
    save_tokenizer(path, 64)
    return path


def mlp_expert(base: Path, out: Path, seed: int, scale: float = 0.01) -> Path:
    """The base with its MLP weights moved by seeded noise (a different expert per seed)."""
    import shutil

    shutil.copytree(base, out)
    sd = load_file(str(base / "model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    save_file({k: v + scale * torch.randn(v.shape, generator=g) if ".mlp." in k else v for k, v in sd.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    base = tiny_llama(root / "base")
    return {"base": base, **{t: mlp_expert(base, root / t, seed=i + 1) for i, t in enumerate(TASKS)}}


def config(family: dict[str, Path], mode: str = "hidden", shared: bool = False, negative: bool = True,
           **extra) -> dict:
    experts = [{"source_model": str(family[t]), "positive_prompts": prompts(t, 8, 0)} for t in TASKS]
    if negative:  # exercised in every mode side by side with mergekit
        experts[0]["negative_prompts"] = prompts("upper", 4, 1)
    cfg = {"base_model": str(family["base"]), "gate_mode": mode, "dtype": "float32", "experts_per_token": 2,
           "experts": experts, **extra}
    if shared:
        cfg["shared_experts"] = [{"source_model": str(family["base"]),
                                  "positive_prompts": [p for t in TASKS for p in prompts(t, 2, 2)]}]
    return cfg


def write(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def build(cfg: dict, out: Path, **options) -> dict:
    return moe.build(moe.from_dict(cfg), moe.MoeOptions(device="cpu", **options), out_dir=out)


# -- the output, in transformers -----------------------------------------------------------

def test_mixtral_loads_and_runs(family, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, MixtralForCausalLM

    info = build(config(family, "cheap_embed"), tmp_path / "m")
    assert info["architecture"] == "MixtralForCausalLM" and info["experts"] == 3
    files = sorted(p.name for p in (tmp_path / "m").iterdir())
    assert files == ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                     "tokenizer_config.json"]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    assert isinstance(model, MixtralForCausalLM)
    assert model.config.num_local_experts == 3 and model.config.num_experts_per_tok == 2
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    batch = tok(["123", "abcdef"], return_tensors="pt", padding=True)
    out = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, batch["input_ids"].shape[1] + 4)
    t = tensors(tmp_path / "m")
    e = {k: tensors(family[k]) for k in TASKS}
    for layer in range(3):
        gate_up = t[f"model.layers.{layer}.mlp.experts.gate_up_proj"]
        down = t[f"model.layers.{layer}.mlp.experts.down_proj"]
        assert gate_up.shape == (3, 256, 64) and down.shape == (3, 64, 128)
        for i, task in enumerate(TASKS):
            src = f"model.layers.{layer}.mlp."
            assert torch.equal(gate_up[i], torch.cat([e[task][src + "gate_proj.weight"],
                                                      e[task][src + "up_proj.weight"]]))
            assert torch.equal(down[i], e[task][src + "down_proj.weight"])


def test_mixtral_of_base_copies_computes_the_base(family, tmp_path):
    """Every expert the base itself: whatever the router picks, the top-k weights sum to
    one, so the MoE's logits are the base's. Checks the fused layout end to end."""
    from transformers import AutoModelForCausalLM

    cfg = config(family, "random")
    for e in cfg["experts"]:
        e["source_model"] = str(family["base"])
    build(cfg, tmp_path / "m", allow_all_same=True)
    ids = torch.tensor([[1, 5, 9, 20, 33, 40, 41]])
    dense = AutoModelForCausalLM.from_pretrained(family["base"]).eval()
    mixed = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert torch.allclose(mixed(ids).logits, dense(ids).logits, atol=1e-5)


def test_qwen_moe_loads_and_runs(family, tmp_path):
    from transformers import AutoModelForCausalLM, Qwen2MoeForCausalLM

    info = build(config(family, "cheap_embed", shared=True), tmp_path / "q")
    assert info["architecture"] == "Qwen2MoeForCausalLM" and info["shared_experts"] == 1
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "q")
    assert isinstance(model, Qwen2MoeForCausalLM)
    t = tensors(tmp_path / "q")
    assert t["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)
    assert not t["model.layers.0.self_attn.q_proj.bias"].any()  # a llama base: zero biases
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 20]])).logits
    assert logits.shape == (1, 4, model.config.vocab_size) and torch.isfinite(logits).all()


def test_the_writer_streams_in_shards(family, tmp_path):
    build(config(family, "random"), tmp_path / "m", shard_bytes=100_000)
    shards = sorted((tmp_path / "m").glob("model-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "m" / "model.safetensors.index.json").is_file()
    build(config(family, "random"), tmp_path / "one")
    assert tensors(tmp_path / "m").keys() == tensors(tmp_path / "one").keys()
    assert all(torch.equal(a, tensors(tmp_path / "one")[k]) for k, a in tensors(tmp_path / "m").items())


# -- routing ------------------------------------------------------------------------------

def top1_shares(folder: Path) -> dict[str, float]:
    """For each task's held-out prompts (not those the routers were built from): the share
    of (token, layer) routing decisions whose top-1 expert is that task's expert."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    shares = {}
    for i, task in enumerate(TASKS):
        batch = tok(prompts(task, 16, 99), return_tensors="pt", padding=True)  # left-padded
        with torch.no_grad():
            out = model(**batch, output_router_logits=True)
        own = batch["attention_mask"].bool() & (batch["input_ids"] != tok.bos_token_id)  # no padding, no BOS
        hits = total = 0
        for layer_logits in out.router_logits:  # [batch x tokens, experts] per layer
            top1 = layer_logits.argmax(dim=-1)[own.reshape(-1)]
            hits += int((top1 == i).sum())
            total += top1.numel()
        shares[task] = hits / total
    return shares


@pytest.mark.parametrize("mode", ["hidden", "cheap_embed"])
def test_routing_picks_each_tasks_expert(family, tmp_path, mode):
    build(config(family, mode, negative=False), tmp_path / "m")
    shares = top1_shares(tmp_path / "m")
    assert min(shares.values()) >= ROUTING_BAR, shares
    build(config(family, "random"), tmp_path / "r")  # the bar is not met by chance
    assert min(top1_shares(tmp_path / "r").values()) < 0.5


# -- the registry -------------------------------------------------------------------------

def test_registered_moe_has_every_parent_and_the_pinned_config(family, registry, zoo_cli, tmp_path):
    registry.add(family["base"], "b", "base")
    cfg = config(family, "cheap_embed")
    for task, e in zip(TASKS, cfg["experts"]):
        registry.add(family[task], f"e-{task}", "expert", base="b", tasks=[task])
        e["source_model"] = f"e-{task}"
    cfg["base_model"] = "b"
    code, out, err = zoo_cli("--registry", registry.path, "moe", write(cfg, tmp_path / "moe.yml"), "--out", "mix",
                             "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["ref"] == "mix@1" and info["architecture"] == "MixtralForCausalLM"
    shown = registry.show("mix")
    assert shown["kind"] == "merged" and sorted(shown["tasks"]) == sorted(TASKS)
    assert [(p["role"], p["ref"]) for p in shown["parents"]] == [("base", "b@1")] + \
        [("expert", f"e-{t}@1") for t in TASKS]
    recipe = shown["recipe"]
    assert recipe["method"] == "moe" and recipe["config"]["base_model"] == "b@1"
    assert [e["source_model"] for e in recipe["config"]["experts"]] == [f"e-{t}@1" for t in TASKS]
    assert recipe["config"]["experts"][1]["positive_prompts"] == prompts("lower", 8, 0)
    card = (registry.model_dir("mix") / "README.md").read_text()
    assert "base_model_relation: merge" in card and "| expert 2 | `e-upper@1` | 8 / 0 |" in card
    code, out, err = zoo_cli("--registry", registry.path, "moe", tmp_path / "moe.yml", "--out-dir", tmp_path / "f")
    assert code == 0 and "built MixtralForCausalLM" in out and (tmp_path / "f" / "config.json").is_file()


def test_prompts_from_the_experts_registered_tasks(family, registry, zoo_cli, tmp_path):
    """Experts without prompts in the config take them from their registered generative
    tasks' pools (JSONL); the lineage keeps the prompts used, and routing still works."""
    from zoo.checkpoints.prompts import FORMAT, Prompt, write_prompts

    registry.add(family["base"], "b", "base")
    for task in TASKS:
        write_prompts(tmp_path / f"{task}.jsonl", [Prompt(p) for p in prompts(task, 12, 5)])
        registry.add_task(task, data=tmp_path / f"{task}.jsonl", data_format=FORMAT)
        registry.add(family[task], f"e-{task}", "expert", base="b", tasks=[task])
    cfg = {"base_model": "b", "gate_mode": "hidden", "dtype": "float32",
           "experts": [{"source_model": f"e-{t}"} for t in TASKS]}
    cfg["experts"][2]["positive_prompts"] = ["ABC"]  # the config's own prompts win
    path = write(cfg, tmp_path / "moe.yml")
    code, _, err = zoo_cli("--registry", registry.path, "moe", path, "--out", "mix")
    assert code == 1 and "expert 0 (e-digits) has no positive_prompts" in err
    code, out, err = zoo_cli("--registry", registry.path, "moe", path, "--out", "mix", "--prompts-from-tasks", "8")
    assert code == 0, err
    experts = registry.show("mix")["recipe"]["config"]["experts"]
    assert experts[0]["positive_prompts"] == prompts("digits", 12, 5)[:8]
    assert experts[2]["positive_prompts"] == ["ABC"]
    shares = top1_shares(registry.model_dir("mix"))
    assert shares["digits"] >= ROUTING_BAR and shares["lower"] >= ROUTING_BAR, shares
    registry.add(family["base"], "plain", "expert", base="b")
    cfg["experts"][1] = {"source_model": "plain"}
    code, _, err = zoo_cli("--registry", registry.path, "moe", write(cfg, tmp_path / "m2.yml"), "--out-dir",
                           tmp_path / "x", "--prompts-from-tasks", "8")
    assert code == 1 and "plain has no positive_prompts and none of its registered tasks" in err


# -- refusals -----------------------------------------------------------------------------

def _bad_cases(family: dict[str, Path], tmp: Path) -> list[tuple[object, str]]:
    vocab64 = llama(tmp / "wide", vocab=64)
    image, image2 = vit(tmp / "vit", 4), vit(tmp / "vit2", 4, seed=1)
    no_prompts = config(family)
    del no_prompts["experts"][1]["positive_prompts"]
    same_prompts = config(family)
    for e in same_prompts["experts"]:
        e["positive_prompts"] = ["x"]
        e.pop("negative_prompts", None)
    other = config(family)
    other["experts"][2]["source_model"] = str(vocab64)
    vit_all = {"base_model": str(image), "gate_mode": "random", "experts": [{"source_model": str(image)},
                                                                           {"source_model": str(image2)}]}
    wrong_arch = config(family)
    wrong_arch["experts"][0]["source_model"] = str(image)
    return [
        ("base_model: [unclosed", "not valid YAML"),
        ("- just\n- a list\n", "a mergekit-moe config is a mapping"),
        ({**config(family), "merge_method": "ties"}, "unknown key(s) 'merge_method'"),
        ({**config(family), "gate_mode": "learned"}, "gate_mode must be one of"),
        ({**config(family), "dtype": "int8"}, "dtype must be one of"),
        ({**config(family), "experts_per_token": 4}, "experts_per_token is 4 but only 3 expert(s)"),
        (no_prompts, "expert 1 ("),
        (same_prompts, "every expert has the same positive and negative prompts"),
        (other, "does not match base"),
        (wrong_arch, "is a vit model but the base"),
        (vit_all, "have no MoE counterpart"),
        ({**config(family), "architecture": "deepseek"}, "writes Mixtral or Qwen MoE"),
        ({**config(family), "architecture": "mixtral", "shared_experts": [{"source_model": str(family["base"])}]},
         "Mixtral has no shared experts"),
        ({**config(family, shared=True), "shared_experts": [{"source_model": str(family["base"])}]},
         "shared expert needs positive_prompts"),
        ({**config(family), "experts": [{"source_model": str(family["digits"]), "positive_prompts": [p]} for p in "12"]},
         "every expert is the same model"),
        ({**config(family), "base_model": str(tmp / "missing")}, "neither a registered model nor a path"),
    ]


def test_bad_input_is_one_line_and_leaves_nothing(family, tmp_path, zoo_cli):
    for i, (cfg, message) in enumerate(_bad_cases(family, tmp_path)):
        path = tmp_path / f"c{i}.yml"
        path.write_text(cfg) if isinstance(cfg, str) else write(cfg, path)
        code, out, err = zoo_cli("moe", path, "--out-dir", tmp_path / "x")
        assert code == 1 and message in err, (message, err)
        assert err.count("\n") == 1 and "Traceback" not in err
        assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))
    code, _, err = zoo_cli("moe", write(config(family), tmp_path / "ok.yml"), "--out", "m")
    assert code == 1 and "needs every model of the config in the registry" in err
    code, _, err = zoo_cli("moe", tmp_path / "ok.yml", "--out-dir", tmp_path / "x", "--hidden-dtype", "int4")
    assert code == 1 and "--hidden-dtype must be one of" in err


# -- side by side with mergekit-moe ---------------------------------------------------------

def _mergekit() -> Path:
    exe = MERGEKIT_VENV / "bin" / "mergekit-moe"
    if not exe.is_file():
        pytest.skip(f"mergekit-moe not found at {exe} (set ZOO_MERGEKIT_VENV to mergekit's venv)")
    return exe


def _mergekit_moe(cfg: dict, out: Path, seed: int = 0) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    run = subprocess.run([str(_mergekit()), str(write(cfg, out.parent / f"{out.name}.yml")), str(out),
                          "--random-seed", str(seed), "--device", "cpu"], capture_output=True, text=True, env=env,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]


@pytest.mark.parametrize("mode, shared, dtype", [
    ("random", False, "float32"), ("uniform_random", False, "float32"), ("cheap_embed", False, "float32"),
    ("hidden", False, "float32"), ("hidden_avg", False, "bfloat16"),
    ("random", True, "float32"), ("hidden", True, "bfloat16"),
])
def test_same_tensors_as_mergekit_moe(family, tmp_path, mode, shared, dtype):
    _mergekit()
    cfg = config(family, mode, shared=shared, dtype=dtype)
    cfg["experts"][2]["residual_scale"] = 0.5
    _mergekit_moe(cfg, tmp_path / "mk", seed=7)
    build(cfg, tmp_path / "zoo", seed=7)
    want, got = tensors(tmp_path / "mk"), tensors(tmp_path / "zoo")
    assert sorted(got, key=natural) == sorted(want, key=natural)
    for name, w in want.items():
        assert got[name].dtype == w.dtype and torch.equal(got[name], w), name
    mk_cfg = json.loads((tmp_path / "mk" / "config.json").read_text())
    cfg_out = json.loads((tmp_path / "zoo" / "config.json").read_text())
    assert {k: v for k, v in cfg_out.items() if k != "transformers_version"} == \
        {k: v for k, v in mk_cfg.items() if k != "transformers_version"}
