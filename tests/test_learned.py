"""Learned merges (AdaMerging, Concrete TA, Concrete AdaMerging) on tiny ViT experts:
the formulas, determinism, that learning lowers the loss, the saved model, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

import zoo.merge as merge
from conftest import LABELS, vit
from zoo.merge.learned import objectives, train
from zoo.merge.learned.merger import Merger, load_mask, rescale
from zoo.merge.learning import learn_from_plan
from zoo.merge.methods import get_method
from zoo.merge.state_dicts import merge_state_dicts
from zoo.merge.plan import make_plan
from zoo import open_checkpoint
from zoo.errors import IncompatibleModels, ZooError


def recipe(method: str, **params):
    return merge.from_dict({"merge_method": method, "base_model": "base", "seed": params.pop("seed", 0),
                            "models": [{"model": f"e{i}"} for i in range(len(LABELS))], "parameters": params})


def family(n: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(5, 4, generator=g), "b": torch.randn(4, generator=g)}
    experts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, experts


def task_vectors(base, experts):
    return [{k: e[k] - base[k] for k in base} for e in experts]


# -- formulas -------------------------------------------------------------------------------
def test_entropy_matches_its_formula():
    from scipy.stats import entropy as scipy_entropy

    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(0))
    p = torch.softmax(logits.double(), -1).numpy()
    expect = scipy_entropy(p, axis=-1).mean()  # -Σ p log p, natural log
    assert abs(float(objectives.entropy(logits)) - expect) < 1e-5
    uniform = torch.zeros(3, 4)
    assert abs(float(objectives.entropy(uniform)) - math.log(4)) < 1e-5


def test_all_ones_mask_with_fixed_lambda_is_task_arithmetic_exactly():
    base, experts = family()
    merger = Merger(base, task_vectors(base, experts), coefficients="fixed", init=0.3, mask=".*")
    ones = rescale({n: torch.ones_like(t) for n, t in base.items()})
    got = merger.merged(ones)
    ta = merge_state_dicts("task_arithmetic", base, experts, [{"weight": 0.3}] * 3)
    for k in base:
        assert torch.equal(got[k], ta[k]), k


def test_gradients_reach_the_mask_logits():
    base, experts = family()
    merger = Merger(base, task_vectors(base, experts), coefficients="fixed", mask=".*")
    sample = merger.sample(torch.Generator().manual_seed(0))
    loss = sum((t ** 2).sum() for t in merger.merged(sample).values())
    loss.backward()
    grads = merger.logit_flat.grad.split(merger.sizes[:len(merger.mask_names)])
    assert len(grads) == 2 and all(g.abs().sum() > 0 for g in grads)  # every masked tensor


def test_mask_sample_is_relaxed_bernoulli_rescaled_by_its_mean():
    base, experts = family()
    merger = Merger(base, task_vectors(base, experts), coefficients="fixed", mask="^w$", temperature=0.5)
    with torch.no_grad():
        merger.logits[0].normal_()
    gen = torch.Generator().manual_seed(3)
    u = torch.rand(base["w"].shape, generator=torch.Generator().manual_seed(3))  # the same CPU stream
    m = torch.sigmoid((merger.logits[0] + torch.log(u) - torch.log1p(-u)) / 0.5)
    sample = merger.sample(gen)
    assert set(sample.values) == {"w"}
    torch.testing.assert_close(sample.values["w"], m / m.mean())


def test_layer_wise_coefficients_are_one_per_task_and_tensor():
    base, experts = family()
    tvs = task_vectors(base, experts)
    merger = Merger(base, tvs, coefficients="layer", init=0.3)
    with torch.no_grad():
        merger.weights.copy_(torch.tensor([[0.1, 0.2], [0.3, 0.4], [0.5, 0.6]]))
    got = merger.merged()
    for j, k in enumerate(merger.names):
        expect = base[k] + sum(merger.weights[i, j].item() * tvs[i][k] for i in range(3))
        torch.testing.assert_close(got[k], expect)


# -- learning on a tiny model ----------------------------------------------------------------
def test_twenty_steps_lower_the_loss(registry, tiny):
    plan = make_plan(recipe("adamerging", steps=20, lr=0.05, batch_size=48), registry)
    result, _ = learn_from_plan(plan, registry, torch.device("cpu"))
    first, last = result.history[0]["loss"], result.history[-1]["loss"]
    assert len(result.history) == 20
    assert last < first  # full-batch entropy: the same inputs every step


@pytest.mark.parametrize("method", ["adamerging", "concrete_ta", "concrete_adamerging"])
def test_a_seed_makes_runs_deterministic(registry, tiny, method):
    extra = {"stage2_steps": 2} if method == "concrete_adamerging" else {}

    def once(seed):
        plan = make_plan(recipe(method, steps=3, lr=0.01, seed=seed, **extra), registry)
        return learn_from_plan(plan, registry, torch.device("cpu"))[0]

    a, b, c = once(1), once(1), once(2)
    assert all(torch.equal(a.merged[k], b.merged[k]) for k in a.merged)
    assert any(not torch.equal(a.merged[k], c.merged[k]) for k in a.merged)


def test_ce_objective_uses_labels_and_says_so(registry, tiny):
    info = merge.run(recipe("adamerging", steps=3, objective="ce", coefficients="task"), "ce-merge",
                     registry=registry)
    learned = registry.show(info["ref"])["recipe"]["learned"]
    assert learned["supervised"] is True and learned["split"] == "val"
    assert learned["coefficient_scope"] == "task" and len(learned["coefficients"]) == len(LABELS)
    card = (registry.model_dir(info["ref"]) / "README.md").read_text()
    assert "supervised" in card and "coefficient_scope: task" in card and "coefficient_tensors" not in card


def test_saved_model_equals_the_in_memory_merge_and_the_stored_mask_rebuilds_it(registry, tiny):
    rec = recipe("concrete_ta", steps=4, lr=0.05, seed=7)
    result, _ = learn_from_plan(make_plan(rec, registry), registry, torch.device("cpu"))
    info = merge.run(rec, "cta", registry=registry)
    out = open_checkpoint(registry.model_dir(info["ref"]))
    for name, t in result.merged.items():
        assert torch.equal(out.read_tensor(name), t), name  # float32 base: stored as is
    # the packed mask in the lineage gives the same weights back: θ0 + 0.3 Σ τ ⊙ m / mean(m)
    bits, logits = load_mask(registry.artifact(info["ref"], "mask"))
    assert set(bits) == set(result.mask_bits) and all(torch.equal(bits[n], result.mask_bits[n]) for n in bits)
    assert set(logits) == set(bits)
    base = open_checkpoint(registry.model_dir("base"))
    experts = [open_checkpoint(registry.model_dir(f"e{i}")) for i in range(3)]
    b = {n: base.read_tensor(n) for n in bits}
    tvs = [{n: e.read_tensor(n) - b[n] for n in bits} for e in experts]
    rebuilt = Merger(b, tvs, coefficients="fixed", init=0.3, mask=".*").merged(rescale(bits))
    for n in bits:
        assert torch.equal(rebuilt[n], out.read_tensor(n)), n
    # verify re-hashes the artifact; removing the merge frees its blob
    mask_blob = registry.artifact(info["ref"], "mask")
    assert registry.verify(info["ref"]) == []
    mask_blob.chmod(0o644)
    data = mask_blob.read_bytes()
    mask_blob.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # one byte flipped
    (problem,) = registry.verify(info["ref"])
    assert problem["file"] == "artifact:mask" and problem["problem"] == "changed"
    registry.remove(info["ref"])
    assert not mask_blob.exists()


def test_mask_pattern_restricts_the_mask(registry, tiny):
    plan = make_plan(recipe("concrete_ta", steps=1, mask=r"attention\.attention\.query"), registry)
    result, _ = learn_from_plan(plan, registry, torch.device("cpu"))
    assert result.mask_bits and all("query" in n for n in result.mask_bits)


# -- bad input -------------------------------------------------------------------------------
def test_mask_pattern_that_matches_nothing(registry, tiny):
    with pytest.raises(ZooError, match="matches none"):
        merge.run(recipe("concrete_ta", steps=1, mask="no_such_tensor"), "x", registry=registry)
    assert not registry.has("x")


def test_task_without_data(registry, tiny, tmp_path):
    registry.add(tiny[1][0], "lonely", "expert", base="base")  # no task, no data
    rec = merge.from_dict({"merge_method": "adamerging", "base_model": "base", "models": [{"model": "lonely"}]})
    with pytest.raises(ZooError, match="has no task data"):
        merge.run(rec, "x", registry=registry)
    empty = tmp_path / "empty.safetensors"
    save_file({"pixel_values": torch.zeros(0, 1, 8, 8)}, str(empty))
    rec = merge.from_dict({"merge_method": "adamerging", "base_model": "base",
                           "models": [{"model": "lonely", "parameters": {"data": str(empty)}}]})
    with pytest.raises(ZooError, match="has no data"):
        merge.run(rec, "x", registry=registry)
    assert not registry.has("x")


def test_ce_without_labels_is_refused(registry, tiny, tmp_path):
    unlabeled = tmp_path / "u.safetensors"
    save_file({"pixel_values": torch.randn(8, 1, 8, 8)}, str(unlabeled))
    rec = merge.from_dict({"merge_method": "adamerging", "base_model": "base", "parameters": {"objective": "ce"},
                           "models": [{"model": "e0", "parameters": {"data": str(unlabeled)}}]})
    with pytest.raises(ZooError, match="needs labels"):
        merge.run(rec, "x", registry=registry)


def test_missing_head_is_refused(registry, tiny, tmp_path):
    """An expert without its task head: each task must run through its own head."""
    import shutil

    from safetensors.torch import load_file

    headless = tmp_path / "headless"
    shutil.copytree(tiny[1][0], headless)
    sd = load_file(str(headless / "model.safetensors"))
    save_file({k: v for k, v in sd.items() if not k.startswith("classifier.")}, str(headless / "model.safetensors"),
              metadata={"format": "pt"})
    rec = merge.from_dict({"merge_method": "adamerging", "base_model": "base",
                           "models": [{"model": str(headless), "parameters": {"task": "t0"}}]})
    with pytest.raises(ZooError, match="head"):
        merge.run(rec, "x", registry=registry)
    assert not registry.has("x")


def test_experts_from_different_bases(registry, tiny, tmp_path):
    other = vit(tmp_path / "other-base", num_labels=10, seed=5)
    registry.add(other, "other-base", "base")
    registry.add(tiny[1][0], "stranger", "expert", base="other-base", tasks=["t0"])
    rec = merge.from_dict({"merge_method": "adamerging", "base_model": "base",
                           "models": [{"model": "e1"}, {"model": "stranger"}]})
    with pytest.raises(IncompatibleModels, match="different bases"):
        merge.run(rec, "x", registry=registry)


def test_nan_loss_stops_with_the_step_and_writes_nothing(registry, tiny):
    base, experts = family()
    merger = Merger(base, task_vectors(base, experts), coefficients="task")
    data = [train.TaskData(f"t{i}", {"x": torch.randn(4, 4)}) for i in range(3)]
    calls = {"n": 0}

    def forward(t, params, batch):
        calls["n"] += 1
        out = batch["x"] @ params["w"].T
        return out * float("nan") if calls["n"] > 6 else out  # step 3 goes bad

    with pytest.raises(ZooError, match="at step 3"):
        m = get_method("adamerging")
        m.fit(merger, forward, data, m.settings({"steps": 5, "batch_size": 2}))


def test_temperature_scaling_recovers_the_temperature():
    """Labels drawn from softmax(z), logits given as 3z: the fitted temperature is ~3."""
    g = torch.Generator().manual_seed(0)
    z = 2 * torch.randn(4000, 5, generator=g)
    y = torch.multinomial(torch.softmax(z, -1), 1, generator=g).squeeze(1)
    assert abs(train.fit_temperature(3 * z, y) - 3) < 0.3


def test_calibrated_entropy_records_the_temperatures(registry, tiny):
    info = merge.run(recipe("adamerging", steps=2, calibrate=True), "cal", registry=registry)
    learned = registry.show(info["ref"])["recipe"]["learned"]
    assert len(learned["temperatures"]) == 3 and all(t > 0 for t in learned["temperatures"])
    assert learned["calibration_split"] == "val"


# -- data from files ----------------------------------------------------------------------------
def test_ties_prestep_keeps_the_entries_that_agree_with_the_elected_sign():
    from zoo.merge.methods.adamerging import ties_prestep

    base, experts = family()
    tvs = task_vectors(base, experts)
    out = ties_prestep(tvs, 0.4, "per_tensor")
    for k in base:
        trimmed = [M_trim(tv[k], 0.4) for tv in tvs]
        sign = torch.stack(trimmed).sum(0) >= 0
        for t, o in zip(trimmed, out):
            expect = torch.where((t != 0) & ((t > 0) == sign), t, torch.zeros_like(t))
            assert torch.equal(o[k], expect)
        assert all((o[k] != 0).sum() <= int(0.4 * base[k].numel()) + 1 for o in out)


def M_trim(t, density):
    from zoo.merge.methods.sparsify import trim_magnitude

    return trim_magnitude(t, density)


def test_image_folder_data(registry, tiny, tmp_path):
    """A folder of images, read with the base's image processor."""
    from PIL import Image
    from transformers import ViTImageProcessor

    ViTImageProcessor(size={"height": 8, "width": 8}, do_normalize=True, image_mean=[0.5], image_std=[0.5]) \
        .save_pretrained(tiny[0])
    # the registry holds a copy of the base: register one with the processor beside it
    registry.add(tiny[0], "base-img", "base")
    folder = tmp_path / "images"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(6):
        arr = (torch.rand(8, 8, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr, mode="L").save(folder / f"{i}.png")
    from zoo.merge.learned.data import from_path

    data = from_path(folder, "t0", registry.model_dir("base-img"), "train", labelled=False)
    assert data.inputs["pixel_values"].shape[0] == 6 and len(data) == 6
    with pytest.raises(ZooError, match="preprocessor_config.json"):
        from_path(folder, "t0", registry.model_dir("base"), "train", labelled=False)


def test_jsonl_texts_with_the_base_tokenizer(tmp_path, registry):
    """A text classifier (tiny BERT) learns from a JSONL file through the base's tokenizer."""
    import json

    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["good", "bad", "fine", "awful", "great", "poor", "ok", "nice"]
    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    tok = BertTokenizerFast(vocab_file=str(vocab))
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words) + 5, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=2)
    base = tmp_path / "bert"
    BertForSequenceClassification(cfg).save_pretrained(base)
    tok.save_pretrained(base)
    expert = tmp_path / "bert-e"
    m = BertForSequenceClassification.from_pretrained(base)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape))
    m.save_pretrained(expert)
    texts = tmp_path / "sst.jsonl"
    texts.write_text("\n".join(json.dumps({"text": f"{a} {b}", "label": int(a in ("good", "great", "nice"))})
                               for a in words for b in words[:3]) + "\n")
    rec = merge.from_dict({"merge_method": "adamerging", "base_model": str(base), "seed": 1,
                           "parameters": {"objective": "ce", "steps": 3, "batch_size": 8},
                           "models": [{"model": str(expert), "parameters": {"data": str(texts)}}]})
    out = merge.run(rec, out_dir=tmp_path / "merged")
    assert (tmp_path / "merged" / "model.safetensors").is_file() and out["path"].endswith("merged")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"txt": "no"}\n')
    rec.models[0].parameters["data"] = str(bad)
    with pytest.raises(ZooError, match="needs a .text. string"):
        merge.run(rec, out_dir=tmp_path / "merged2")
    assert not (tmp_path / "merged2").exists()
