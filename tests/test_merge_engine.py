"""The streaming engine against the in-memory methods, the registry and bad input."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import zoo.merge as merge
from conftest import db_dump, expert_family, llama, lora_adapter, store_listing, vit
from zoo.merge.state_dicts import merge_state_dicts
from zoo import open_checkpoint
from zoo.errors import AlreadyExists, IncompatibleModels, NotFound, ZooError

ZOO = str(Path(sys.executable).with_name("zoo"))


def state(path: Path) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(path)
    return {n: ck.read_tensor(n) for n in ck.tensors}


@pytest.fixture
def llama_family(tmp_path, registry):
    base, experts = expert_family(tmp_path)
    registry.add(base, "base", "base")
    for i, p in enumerate(experts):
        registry.add(p, f"e{i}", "expert", base="base", tasks=[f"t{i}"])
    return base, experts


@pytest.mark.parametrize("method, params, options", [
    ("task_arithmetic", {"weight": 0.3}, {}),
    ("ties", {"weight": 0.3, "density": 0.2}, {}),
    ("ties", {"weight": 1.0, "density": 0.5}, {"normalize": False, "lambda": 0.5}),
    ("ties", {"weight": 0.3, "density": 0.2}, {"trim": "global"}),
    ("dare_ties", {"weight": 1.0, "density": 0.5}, {}),
    ("breadcrumbs", {"weight": 0.3, "density": 0.8, "gamma": 0.05}, {}),
    ("model_stock", {}, {}),
    ("linear", {"weight": 1.0}, {}),
])
@pytest.mark.parametrize("chunk, keep_whole", [(None, True), (100, False), (100, True)])
@pytest.mark.parametrize("compute", ["float32", None])
def test_streaming_equals_in_memory(registry, llama_family, method, params, options, chunk, keep_whole, compute,
                                    monkeypatch):
    """Whole tensors; (100, False) every elementwise tensor streamed in pieces of 100,
    statistics gathered over pieces; (100, True) tensors that need statistics read whole
    and then walked in slices of 100. In float32, or (None) in the models' bfloat16."""
    from zoo.merge import engine

    if not keep_whole and method == "ties":
        pytest.skip("magnitudes tied at the cut-off (bfloat16 inputs): a tensor streamed for its statistics keeps "
                    "the first ones by position, the in-memory merge mergekit's sort order (both keep exactly k)")
    if chunk:
        monkeypatch.setattr(engine, "CHUNK_ELEMS", chunk)
    if not keep_whole:
        monkeypatch.setattr(engine, "STATS_WHOLE_ELEMS", 0)
    base, experts = llama_family
    recipe = merge.from_dict({"merge_method": method, "base_model": "base", "parameters": options, "seed": 3,
                              "dtype": compute, "out_dtype": "bfloat16" if compute else None,
                              "models": [{"model": f"e{i}", "parameters": params} for i in range(3)]
                              + ([{"model": "base", "parameters": params}] if method == "linear" else [])})
    info = merge.run(recipe, "m", registry=registry, shard_bytes=40_000)
    out_dir = registry.model_dir(info["ref"])
    assert (out_dir / "model.safetensors.index.json").is_file()  # sharded at 40 kB
    got = state(out_dir)
    b = state(base)
    inputs = [state(e) for e in experts] + ([b] if method == "linear" else [])  # linear averages the base too
    ref = merge_state_dicts(method, b, inputs, [params] * len(inputs), seed=3,
                            dtype=torch.float32 if compute else torch.bfloat16, **options)
    assert set(got) == set(b)
    for name, t in got.items():
        assert t.dtype == torch.bfloat16  # out_dtype, else the base's
        assert torch.equal(t, ref[name].to(torch.bfloat16)), name


def test_rerun_reproduces_bytes_and_records_lineage(registry, llama_family):
    recipe = merge.from_cli("dare_linear", "base", ["e0", "e1", "e2"], ["density=0.5", "weight=0.3"], seed=11)
    a = merge.run(recipe, "a", registry=registry)
    b = merge.run(recipe, "b", registry=registry)
    files = lambda r: {f["path"]: f["sha256"] for f in registry.show(r)["files"]}  # noqa: E731
    fa, fb = files(a["ref"]), files(b["ref"])
    assert {k: v for k, v in fa.items() if k != "README.md"} == {k: v for k, v in fb.items() if k != "README.md"}
    shown = registry.show("a")
    assert [(p["role"], p["ref"]) for p in shown["parents"]] == [("base", "base@1"), ("expert", "e0@1"),
                                                                  ("expert", "e1@1"), ("expert", "e2@1")]
    assert shown["recipe"]["merge_method"] == "dare_linear" and shown["recipe"]["seed"] == 11
    assert shown["tasks"] == ["t0", "t1", "t2"] and shown["kind"] == "merged"
    # re-running the stored recipe gives the same bytes again
    again = merge.run(merge.from_dict(shown["recipe"]), "c", registry=registry)
    assert files(again["ref"])["model.safetensors"] == fa["model.safetensors"]


def test_model_card_and_sidecars(registry, llama_family):
    info = merge.run(merge.from_cli("task_arithmetic", "base", ["e0", "e1"], ["weight=0.3"]), "m", registry=registry)
    folder = registry.model_dir(info["ref"])
    card = (folder / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front == {"base_model": ["base@1", "e0@1", "e1@1"], "base_model_relation": "merge",
                     "library_name": "transformers", "tags": ["merge", "zoo"]}
    assert "merge_method: task_arithmetic" in card
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"


def test_transformers_loads_the_merge(registry, llama_family, tmp_path):
    from transformers import LlamaForCausalLM

    base, experts = llama_family
    info = merge.run(merge.from_cli("task_arithmetic", "base", ["e0", "e1", "e2"], ["weight=0.3"]), "m", registry=registry)
    model = LlamaForCausalLM.from_pretrained(registry.model_dir(info["ref"]), torch_dtype=torch.bfloat16)
    # no dtype: computed in the models' bfloat16, as mergekit does
    ref = merge_state_dicts("task_arithmetic", state(base), [state(e) for e in experts], [{"weight": 0.3}] * 3,
                            dtype=torch.bfloat16)
    assert torch.equal(model.state_dict()["model.layers.0.self_attn.q_proj.weight"],
                       ref["model.layers.0.self_attn.q_proj.weight"].to(torch.bfloat16))


def test_heads_are_kept_per_task(registry, tmp_path):
    """One expert merged at weight 1 is that expert: per-task eval through its kept head
    must give exactly the expert's logits."""
    from zoo.evaluate import load_model

    registry.add(vit(tmp_path / "b", 10), "b", "base")
    registry.add(vit(tmp_path / "p", 2, seed=1), "p", "expert", base="b", tasks=["parity"])
    registry.add(vit(tmp_path / "m", 3, seed=2), "m3", "expert", base="b", tasks=["mod3"])
    recipe = merge.from_dict({"merge_method": "task_arithmetic", "base_model": "b",
                              "models": [{"model": "p", "parameters": {"weight": 1.0}},
                                         {"model": "m3", "parameters": {"weight": 0.0}}]})
    info = merge.run(recipe, "merged", registry=registry)
    heads = registry.show(info["ref"])
    assert {f["path"] for f in heads["files"]} >= {"task_heads.safetensors", "model.safetensors"}
    x = torch.randn(4, 1, 8, 8)
    merged_p = load_model(registry, "merged", "parity")
    expert_p = load_model(registry, "p")
    torch.testing.assert_close(merged_p(pixel_values=x).logits, expert_p(pixel_values=x).logits)
    assert load_model(registry, "merged", "mod3").config.num_labels == 3


def test_lora_expert_task_vector_is_scale_b_a(registry, tmp_path):
    base = llama(tmp_path / "b")
    registry.add(base, "b", "base")
    registry.add(lora_adapter(tmp_path / "ad", base, r=4), "ad", "adapter", base="b")
    info = merge.run(merge.from_dict({"merge_method": "task_arithmetic", "base_model": "b",
                                      "models": [{"model": "ad", "parameters": {"weight": 1.0}}]}),
                     "m", registry=registry)
    got = state(registry.model_dir(info["ref"]))
    b = state(base)
    ad = open_checkpoint(tmp_path / "ad")
    name = "model.layers.1.self_attn.v_proj"
    A = ad.read_tensor(f"base_model.model.{name}.lora_A.weight")
    B = ad.read_tensor(f"base_model.model.{name}.lora_B.weight")
    torch.testing.assert_close(got[name + ".weight"], b[name + ".weight"] + (8 / 4) * (B @ A), rtol=1e-5, atol=1e-5)
    assert torch.equal(got["model.layers.1.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])


def test_mergekit_recipe_with_paths(tmp_path, llama_family, registry):
    base, experts = llama_family
    cfg = tmp_path / "recipe.yml"
    cfg.write_text(yaml.safe_dump({
        "merge_method": "ties", "base_model": str(base), "dtype": "float32", "out_dtype": "bfloat16",
        "parameters": {"normalize": True},
        "models": [{"model": str(base)}] + [{"model": str(e), "parameters": {"weight": 0.3, "density": 0.2}}
                                            for e in experts]}))
    out = merge.run(merge.load(cfg), out_dir=tmp_path / "out")
    got = state(Path(out["path"]))
    ref = merge_state_dicts("ties", state(base), [state(e) for e in experts], [{"weight": 0.3, "density": 0.2}] * 3)
    assert all(torch.equal(got[k], ref[k].to(torch.bfloat16)) for k in ref)


def test_bad_merges_leave_nothing(registry, llama_family, tmp_path):
    registry.add(vit(tmp_path / "v"), "vit", "base")
    registry.add(llama(tmp_path / "wide", vocab=160), "wide", "base")
    before, blobs = db_dump(registry.path), store_listing(registry.path)
    cases = [
        (dict(method="task_arithmetic", base="base", models=["vit"]), IncompatibleModels, "vit model but the base"),
        (dict(method="task_arithmetic", base="base", models=["wide"]), IncompatibleModels, "vocab"),
        (dict(method="ties", base="base", models=["e0"], params=["density=1.5"]), ZooError, "density"),
        (dict(method="ties", base="base", models=["e0"], params=["density=0.5"]), ZooError, "no weight for e0"),
        (dict(method="ties", base="base", models=["e0"], params=["weight=.nan"]), ZooError, "finite"),
        (dict(method="ties", base="base", models=["e0"], params=["colour=1"]), ZooError, "unknown parameter"),
        (dict(method="warp", base="base", models=["e0"]), ZooError, "unknown merge method"),
        (dict(method="task_arithmetic", base="base", models=["nothere"]), NotFound, "nothere"),
        (dict(method="task_arithmetic", base="base", models=["e0"], out="e1"), AlreadyExists, "already exists"),
    ]
    for case, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            recipe = merge.from_cli(case["method"], case["base"], case["models"], case.get("params", []))
            merge.run(recipe, case.get("out", "new"), registry=registry)
    # a missing tensor
    sd = load_file(str(llama_family[1][0] / "model.safetensors"))
    del sd["model.norm.weight"]
    from safetensors.torch import save_file

    (tmp_path / "holey").mkdir()
    save_file(sd, str(tmp_path / "holey" / "model.safetensors"))
    (tmp_path / "holey" / "config.json").write_text((llama_family[1][0] / "config.json").read_text())
    with pytest.raises(IncompatibleModels, match="missing"):
        merge.run(merge.from_cli("task_arithmetic", "base", [str(tmp_path / "holey")], ["weight=0.3"]), "new",
                  registry=registry)
    assert db_dump(registry.path) == before
    assert registry.list(kind="merged") == []
    assert store_listing(registry.path) == blobs
    assert [p for p in registry.store.tmp.iterdir()] == []


def _sparse_model(path: Path, mb_per_tensor: int, n: int = 2) -> Path:
    """A bare safetensors file of zeros that costs no disk (sparse) and no time to make."""
    import struct

    path.mkdir()
    numel = mb_per_tensor * (1 << 20) // 4
    header = {f"w{i}": {"dtype": "F32", "shape": [numel], "data_offsets": [i * numel * 4, (i + 1) * numel * 4]}
              for i in range(n)}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + n * numel * 4)
    return path


def test_ctrl_c_midway_leaves_nothing(tmp_path, subprocess_env):
    reg = tmp_path / "registry.db"
    for args in (["add", _sparse_model(tmp_path / "b", 256), "-n", "b", "-k", "base", "--in-place"],
                 ["add", _sparse_model(tmp_path / "e", 256), "-n", "e", "-b", "b", "--in-place"]):
        assert subprocess.run([ZOO, "--registry", reg, *map(str, args)], env=subprocess_env).returncode == 0
    before = db_dump(reg)
    tmpdir = reg.with_suffix(".store") / "tmp"
    p = subprocess.Popen([ZOO, "--registry", str(reg), "merge", "--method", "task_arithmetic", "--base", "b", "e",
                          "-p", "weight=0.3", "--out", "m"], stderr=subprocess.PIPE, text=True, env=subprocess_env)
    deadline = time.time() + 60
    started = False
    while time.time() < deadline and not started:
        started = any(f.stat().st_size > 1 << 20 for f in tmpdir.glob("*.merge/model.safetensors")) \
            if tmpdir.exists() else False
        time.sleep(0.005)
    assert started, "the merge never started writing"
    p.send_signal(signal.SIGINT)
    assert p.wait() == 130
    assert p.stderr.read().strip().splitlines() == ["error: interrupted; no half-finished change was saved"]
    assert db_dump(reg) == before
    assert list(tmpdir.iterdir()) == []


def test_disk_full_leaves_nothing(tmp_path, subprocess_env):
    import resource

    reg = tmp_path / "registry.db"
    base = llama(tmp_path / "b", vocab=20000)  # ~2.7 MB of embeddings
    e = llama(tmp_path / "e", vocab=20000, seed=1)
    for args in (["add", base, "-n", "b", "-k", "base"], ["add", e, "-n", "e", "-b", "b"]):
        assert subprocess.run([ZOO, "--registry", reg, *map(str, args)], env=subprocess_env).returncode == 0
    before, blobs = db_dump(reg), store_listing(reg)

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    full = subprocess.run([ZOO, "--registry", str(reg), "merge", "--method", "task_arithmetic", "--base", "b", "e",
                           "-p", "weight=0.3", "--out", "m"], capture_output=True, text=True, env=subprocess_env, preexec_fn=limit)
    assert full.returncode == 1 and full.stderr.startswith("error: disk full"), full.stderr
    assert full.stderr.count("\n") == 1
    assert db_dump(reg) == before and store_listing(reg) == blobs
    assert list((reg.with_suffix(".store") / "tmp").iterdir()) == []


def test_progress_counts_tensors_and_bytes(registry, llama_family):
    """Every tensor and byte of the output is reported once; trim: global adds a
    scanning bar for its two passes over the merged tensors."""
    bars: dict[str, list] = {}

    def factory(desc, total, total_items=0):
        rec = bars.setdefault(desc, [total, total_items, 0, 0])

        def advance(n, items=0):
            rec[2] += n
            rec[3] += items
        return advance

    recipe = merge.from_dict({"merge_method": "ties", "base_model": "base", "parameters": {"trim": "global"},
                              "models": [{"model": f"e{i}", "parameters": {"density": 0.2, "weight": 0.3}} for i in range(3)]})
    info = merge.run(recipe, "m", registry=registry, progress=factory)
    out = registry.checkpoint(info["ref"])
    merging = bars.pop("merging m")
    assert merging == [merging[0], len(out.tensors), merging[0], len(out.tensors)]
    assert merging[0] == sum(t.nbytes for t in out.tensors.values())
    (desc, scan), = bars.items()
    assert desc.startswith("scanning m") and scan[0] == scan[2] > 0 and scan[1] == scan[3] > 0


def test_merge_bar_moves_during_the_ties_threshold_passes(registry, llama_family, monkeypatch):
    """A streamed tensor's statistics passes move the merge bar before its merge pass
    starts; each tensor still reports exactly its bytes, once."""
    from zoo.merge import engine
    from zoo.merge.methods.ties import Ties

    monkeypatch.setattr(engine, "CHUNK_ELEMS", 256)
    monkeypatch.setattr(engine, "STATS_WHOLE_ELEMS", 0)  # every tensor streamed, its passes too
    events: list[tuple] = []

    def factory(desc, total, total_items=0):
        def advance(n, items=0):
            events.append(("bar", desc, n, items))
        return advance

    merge_piece = Ties.merge

    def recording(self, *args):
        events.append(("merge",))
        return merge_piece(self, *args)

    monkeypatch.setattr(Ties, "merge", recording)
    recipe = merge.from_dict({"merge_method": "ties", "base_model": "base",
                              "models": [{"model": f"e{i}", "parameters": {"density": 0.2, "weight": 0.3}} for i in range(3)]})
    info = merge.run(recipe, "m", registry=registry, progress=factory)
    first_merge = events.index(("merge",))
    before = [e for e in events[:first_merge] if e[0] == "bar"]
    assert before and all(e[1] == "merging m" and e[3] == 0 for e in before) and sum(e[2] for e in before) > 0
    out = registry.checkpoint(info["ref"])
    bars = [e for e in events if e[0] == "bar"]
    assert sum(e[2] for e in bars) == sum(t.nbytes for t in out.tensors.values())
    assert sum(e[3] for e in bars) == len(out.tensors)


@pytest.mark.parametrize("method,bad", [("task_arithmetic", float("nan")), ("ties", float("inf")),
                                        ("slerp", float("nan")), ("linear", float("-inf"))])
def test_non_finite_inputs_are_refused_by_name(registry, llama_family, tmp_path, method, bad):
    """A NaN or an infinity in an expert stops the merge with the tensor's and the model's
    name; nothing is written or registered (streamed, whole and held paths alike)."""
    from safetensors.torch import save_file

    base, experts = llama_family[0], llama_family[1]
    sd = load_file(str(experts[0] / "model.safetensors"))
    name = "model.layers.0.mlp.up_proj.weight"
    sd[name] = sd[name].clone()
    sd[name].view(-1)[7] = bad
    sick = tmp_path / "sick"
    sick.mkdir()
    save_file(sd, str(sick / "model.safetensors"))
    (sick / "config.json").write_text((experts[0] / "config.json").read_text())
    before, blobs = db_dump(registry.path), store_listing(registry.path)
    models = [str(sick)] if method == "slerp" else [str(sick), str(experts[1])]
    params = {"ties": ["density=0.5", "weight=0.3"], "task_arithmetic": ["weight=0.3"], "slerp": ["t=0.5"],
              "linear": ["weight=1"]}[method]
    with pytest.raises(ZooError, match=rf"sick has NaN or infinite values in {name}; nothing was written"):
        merge.run(merge.from_cli(method, str(base), models, params), "new", registry=registry)
    with pytest.raises(ZooError, match="NaN or infinite"):
        merge.run(merge.from_cli(method, str(base), models, params), out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))
    assert db_dump(registry.path) == before and store_listing(registry.path) == blobs


def test_a_merge_that_overflows_is_refused(registry, llama_family, tmp_path):
    """Finite inputs whose merge is not finite (a huge lambda) are refused too."""
    base, experts = llama_family[0], llama_family[1]
    with pytest.raises(ZooError, match="gave NaN or infinite values although every input is finite"):
        merge.run(merge.from_cli("task_arithmetic", str(base), [str(e) for e in experts], ["weight=3e38", "lambda=3e38"]),
                  out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_merge_with_a_protected_model_warns(registry, llama_family, tmp_path):
    """Merging MergeLock-protected weights gives a broken model by design: the merge says so
    (by registry kind, and by the files' stamp for a path), and still runs (the demo
    measures exactly that)."""
    import zoo.protect as protect

    base, experts = llama_family
    protect.protect("e0", "e0-locked", registry=registry, seed=3)
    protect.protect(str(experts[1]), out_dir=tmp_path / "locked-path", registry=registry, seed=4)
    said: list[str] = []
    merge.run(merge.from_cli("task_arithmetic", "base", ["e0-locked", str(tmp_path / "locked-path"), "e2"], ["weight=0.3"]),
              out_dir=tmp_path / "m", registry=registry, log=said.append)
    assert [s.split(" is ")[0] for s in said] == ["warning: e0-locked@1", f"warning: {tmp_path / 'locked-path'}"]
    assert all("MergeLock-protected" in s for s in said) and (tmp_path / "m").is_dir()
    said.clear()
    merge.run(merge.from_cli("task_arithmetic", "base", ["e0", "e1"], ["weight=0.3"]), out_dir=tmp_path / "m2",
              registry=registry, log=said.append)
    assert said == []


@pytest.mark.parametrize("keep_whole", [True, False])
def test_ties_keeps_exactly_k_where_magnitudes_tie(registry, llama_family, tmp_path, monkeypatch, keep_whole):
    """bfloat16 task vectors tie at the cut-off: held whole or streamed in pieces, TIES
    keeps exactly max(1, floor(density * n)) entries of each tensor, as mergekit does."""
    from zoo.merge import engine

    monkeypatch.setattr(engine, "CHUNK_ELEMS", 100)
    if not keep_whole:
        monkeypatch.setattr(engine, "STATS_WHOLE_ELEMS", 0)
    base, experts = llama_family
    recipe = merge.from_dict({"merge_method": "ties", "base_model": "base", "dtype": "float32",
                              "parameters": {"normalize": False},
                              "models": [{"model": "e0", "parameters": {"weight": 1.0, "density": 0.5}}]})
    out = merge.run(recipe, out_dir=tmp_path / "out", registry=registry)
    got, b, e = state(Path(out["path"])), state(base), state(experts[0])
    tied = 0
    for name, t in got.items():
        delta = e[name].float() - b[name].float()
        k = max(1, int(0.5 * delta.numel()))
        thr = delta.abs().flatten().topk(k).values[-1]
        tied += int((delta.abs() >= thr).sum()) > k
        assert int((t != b[name].float()).sum()) == min(k, int((delta != 0).sum())), name
    assert tied  # the case this is about
