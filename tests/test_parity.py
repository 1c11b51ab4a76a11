"""Parity distillation (merge method ``parity``): the selection rule, the loss, cached
teacher outputs, a tiny run whose disagreement falls, starts rebuilt from the lineage,
protected teachers, determinism, and bad input."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import zoo.merge as merge
from conftest import LABELS, perturbed_expert
from zoo.merge.learned.merger import Merger
from zoo.merge.learned.parity import TeacherFactory, distill, parity_loss, parity_rule, weak_view
from zoo.merge.learned.train import TaskData
from zoo.merge.methods import get_method
from zoo import open_checkpoint
from zoo.errors import ZooError
from zoo.evaluate import evaluate


def recipe(start: str = "task_arithmetic", models=None, **params):
    params = {"tau": 0.05, "view": "none", "rounds": 2, "steps": 15, "lr": 0.05, "start": start, **params}
    models = models or [{"model": f"e{i}"} for i in range(len(LABELS))]
    return merge.from_dict({"merge_method": "parity", "base_model": "base", "seed": params.pop("seed", 0),
                            "models": models, "parameters": params})


def settings(**options):
    """Distillation settings: the parity method's defaults under ``options``."""
    return get_method("parity").settings(options)


def weights(registry, name):
    ck = open_checkpoint(registry.model_dir(name))
    return {n: ck.read_tensor(n) for n in ck.tensors}


def final(rows):
    """The rows of the round whose merge was kept."""
    return [r for r in rows if r["kept"]]


def average(rows, key):
    return sum(r[key] for r in rows) / len(rows)


# -- the rule and the loss ----------------------------------------------------------------------
def test_parity_rule_on_all_four_cases():
    # sample: 0 reliable+disagree, 1 reliable+agree, 2 unreliable (low confidence)+disagree,
    # 3 unreliable (low confidence)+agree, 4 unreliable (second view differs)+disagree
    confidence = torch.tensor([0.95, 0.99, 0.50, 0.60, 0.97])
    pred = torch.tensor([1, 2, 0, 3, 1])
    view_pred = torch.tensor([1, 2, 0, 3, 2])
    student = torch.tensor([0, 2, 1, 3, 0])
    sel = parity_rule(confidence, pred, view_pred, student, tau=0.9)
    assert sel.reliable.tolist() == [True, True, False, False, False]
    assert sel.agree.tolist() == [False, True, False, True, False]
    assert sel.parity.tolist() == [True, False, False, False, False]
    assert sel.agreeing.tolist() == [False, True, False, False, False]
    # without a second view only confidence decides; tau = 1 keeps only certain samples
    assert parity_rule(confidence, pred, None, student, 0.9).parity.tolist() == [True, False, False, False, True]
    assert not parity_rule(confidence, pred, None, student, 1.0).reliable.any()


def test_parity_loss_is_ce_plus_scaled_kl_plus_agreeing_kl():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    s = settings(kl_weight=0.5, kl_temperature=2.0, agree_weight=0.1)

    def kl(p_logits, q_logits):  # KL(p ‖ q), mean over rows
        p = p_logits.softmax(-1)
        return (p * (p.log() - q_logits.log_softmax(-1))).sum(-1).mean()

    expect = (F.cross_entropy(student[:4], teacher[:4].argmax(-1)) + 0.5 * 4 * kl(teacher[:4] / 2, student[:4] / 2)
              + 0.1 * kl(teacher[4:], student[4:]))
    torch.testing.assert_close(parity_loss(student, teacher, 4, s), expect)
    plain = settings(kl_weight=0.0, agree_weight=0.0)
    torch.testing.assert_close(parity_loss(student, teacher, 4, plain),
                               F.cross_entropy(student[:4], teacher[:4].argmax(-1)))


def test_weak_views():
    g = torch.Generator().manual_seed(0)
    images = torch.arange(2 * 1 * 3 * 3, dtype=torch.float32).reshape(2, 1, 3, 3)
    shifted = weak_view({"pixel_values": images}, "shift", 0.1, g)["pixel_values"]
    for i in range(2):  # each image moved by exactly one pixel, edges repeated
        moved = [F.pad(images[i:i + 1], (1, 1, 1, 1), mode="replicate")[0, :, r:r + 3, c:c + 3]
                 for r, c in ((0, 1), (2, 1), (1, 0), (1, 2))]
        assert any(torch.equal(shifted[i], m) for m in moved)
    ids = torch.full((4, 50), 7)
    mask = torch.ones_like(ids)
    mask[:, 40:] = 0
    dropped = weak_view({"input_ids": ids, "attention_mask": mask}, "auto", 0.2, g, pad_id=0)
    hit = dropped["input_ids"] == 0
    assert hit.any() and not hit[:, 0].any() and not hit[:, 40:].any()
    assert torch.equal(dropped["attention_mask"], mask)
    noisy = weak_view({"pixel_values": images}, "auto", 0.1, g)["pixel_values"]  # auto: noise on floats
    assert 0.05 < float((noisy - images).std() / images.std()) < 0.2
    assert weak_view({"pixel_values": images}, "none", 0.1, g) is None
    with pytest.raises(ZooError, match="does not apply"):
        weak_view({"input_ids": ids}, "shift", 0.1, g)


# -- the loop on toy tensors ---------------------------------------------------------------------
def toy(n_tasks=2, n=40, seed=0):
    """A linear 'model' (logits = x @ w + b) with two experts and their pools."""
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(5, 3, generator=g), "b": torch.zeros(3)}
    experts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_tasks)]
    data = [TaskData(f"t{i}", {"x": torch.randn(n, 5, generator=g)}) for i in range(n_tasks)]

    def forward(t, params, batch):
        return batch["x"] @ params["w"] + params["b"]
    return base, experts, data, forward


def test_teacher_outputs_are_computed_once_and_reused_across_rounds():
    base, experts, data, forward = toy()
    built, calls = [0, 0], [0, 0]

    def factory(t) -> TeacherFactory:
        def make():
            built[t] += 1

            def teacher(batch):
                calls[t] += 1
                return forward(t, experts[t], batch)
            return teacher
        return make

    merger = Merger(base, [{k: e[k] - base[k] for k in base} for e in experts], coefficients="layer")
    s = settings(tau=0.05, view="noise", rounds=4, steps=3, batch_size=8)
    result = distill(merger, forward, [factory(0), factory(1)], data, s)
    assert built == [1, 1]
    assert calls == [2, 2]  # one chunk of 40, and its second view: once, not once per round or step
    assert sorted({r["round"] for r in result.rounds}) == [0, 1, 2, 3, 4]


def test_empty_parity_set_is_reported_and_skipped():
    base, experts, data, forward = toy()
    tvs = [{k: e[k] - base[k] for k in base} for e in experts]
    # task 0's 'expert' is the base itself: the merge with zero coefficients agrees everywhere
    merger = Merger(base, tvs, coefficients="layer", init=0.0)
    teachers = [lambda: (lambda b: forward(0, base, b)), lambda: (lambda b: forward(1, experts[1], b))]
    notes = []
    result = distill(merger, forward, teachers, data, settings(tau=0.05, view="none", rounds=2, steps=4),
                     log=notes.append)
    assert any("'t0' has an empty parity set" in n for n in notes)
    first = [r for r in result.rounds if r["round"] == 0]
    assert first[0]["parity"] == 0 and first[1]["parity"] > 0
    assert result.steps_done == 8  # task 1 still trained


def test_label_set_mismatch_is_refused():
    base, experts, data, forward = toy()
    tvs = [{k: e[k] - base[k] for k in base} for e in experts]
    merger = Merger(base, tvs, coefficients="layer")
    wide = lambda: (lambda b: torch.cat([forward(1, experts[1], b), torch.zeros(len(b["x"]), 2)], dim=1))  # noqa: E731
    teachers = [lambda: (lambda b: forward(0, experts[0], b)), wide]
    with pytest.raises(ZooError, match="task 't1': its teacher predicts 5 labels but the merged model's head "
                                       "for it has 3"):
        distill(merger, forward, teachers, data, settings(tau=0.05, view="none"))


@pytest.mark.parametrize("tau", [0.0, -0.1, 1.5])
def test_tau_outside_the_unit_interval_is_refused(tau, registry, tiny):
    with pytest.raises(ZooError, match=r"tau .*must be in \(0, 1\]"):
        merge.run(recipe(tau=tau), "p", registry=registry)
    assert not registry.has("p")


# -- on tiny ViT experts, through the registry ---------------------------------------------------
def test_disagreement_falls_and_the_lineage_and_metrics_say_so(registry, tiny):
    info = merge.run(recipe(rounds=3, steps=20, lr=0.01), "p", registry=registry)
    rows = info["parity"]
    start, end = [r for r in rows if r["round"] == 0], final(rows)
    assert average(end, "disagreement") < 0.5 * average(start, "disagreement")
    by_round = {r: average([x for x in rows if x["round"] == r], "disagreement") for r in range(4)}
    assert end[0]["round"] == min(by_round, key=by_round.get)  # keep: best, judged without labels
    assert all(r["pool"] == 48 for r in rows)
    shown = registry.show("p")
    learned = shown["recipe"]["learned"]
    assert learned["objective"] == "parity" and learned["supervised"] is False
    assert learned["teachers"] == ["e0@1", "e1@1", "e2@1"] and learned["tau"] == 0.05
    assert learned["train"] == ["coefficients"] and learned["rounds"] == 3 and learned["start"] == {
        "method": "task_arithmetic"}
    assert learned["table"] == rows
    metrics = {(m["task"], m["metric"]): m for m in shown["metrics"]}
    for r in end:  # the final round, stored as metrics
        assert metrics[r["task"], "parity_set"]["value"] == r["parity"]
        assert metrics[r["task"], "disagreement"]["value"] == pytest.approx(r["disagreement"])
        assert metrics[r["task"], "disagreement"]["split"] == "train"
        assert metrics[r["task"], "accuracy"]["split"] == "test"
    # the recorded accuracy is what an independent evaluation of the saved model gives
    for r in evaluate(registry, "p", ["t0", "t1", "t2"], split="test", record=False):
        assert r["value"] == pytest.approx(metrics[r["task"], "accuracy"]["value"])


def test_keep_last_returns_the_last_round(registry, tiny):
    """keep: last saves the merge after the last round, whatever its disagreement; the
    saved weights are the ones the table measured (restarting from them reproduces it)."""
    info = merge.run(recipe(rounds=2, steps=10, lr=0.05, keep="last"), "p", registry=registry)
    assert {r["round"] for r in final(info["parity"])} == {2}
    again = merge.run(recipe("p", rounds=1, steps=1, lr=1e-12), "p2", registry=registry)
    assert [r["disagreement"] for r in again["parity"] if r["round"] == 0] == \
        [r["disagreement"] for r in final(info["parity"])]


def test_start_from_a_registered_concrete_merge_is_rebuilt_exactly(registry, tiny):
    merge.run(merge.from_dict({"merge_method": "concrete_ta", "base_model": "base", "parameters": {"steps": 5},
                               "models": [{"model": f"e{i}"} for i in range(3)]}), "cta", registry=registry)
    info = merge.run(recipe("cta", rounds=1, steps=10), "p", registry=registry)
    start = [r for r in info["parity"] if r["round"] == 0]
    accuracy = {r["task"]: r["value"] for r in evaluate(registry, "cta", ["t0", "t1", "t2"], record=False)}
    assert [r["accuracy"] for r in start] == pytest.approx([accuracy[r["task"]] for r in start])
    assert registry.show("p")["recipe"]["learned"]["start"] == {"model": "cta@1", "method": "concrete_ta"}
    assert {"role": "start", "ref": "cta@1", "present": True} in registry.show("p")["parents"]
    # the parity merge keeps the start's mask: the same bits in its own lineage
    a, b = (merge.learned.merger.load_mask(registry.artifact(n, "mask"))[0] for n in ("cta", "p"))
    assert all(torch.equal(a[n], b[n]) for n in a)


@pytest.mark.parametrize("train", ["mask", "params", "coefficients,params"])
def test_a_parity_merge_restarts_where_it_ended(registry, tiny, train):
    """A parity merge as a start is rebuilt from its lineage (coefficients, mask,
    offsets): zero further steps reproduce its weights."""
    merge.run(recipe(train=train, rounds=1, steps=10), "p1", registry=registry)
    learned = registry.show("p1")["recipe"]["learned"]
    assert ("offset_tensors" in learned) == ("params" in train)
    again = merge.run(recipe("p1", train="coefficients", rounds=1, steps=1, lr=1e-12), "p2", registry=registry)
    end, start = final(registry.show("p1")["recipe"]["learned"]["table"]), \
        [r for r in again["parity"] if r["round"] == 0]
    assert [r["disagreement"] for r in start] == [r["disagreement"] for r in end]
    w1, w2 = weights(registry, "p1"), weights(registry, "p2")
    for n in w1:
        torch.testing.assert_close(w2[n], w1[n], rtol=1e-5, atol=1e-6)


def test_a_start_with_other_experts_is_refused(registry, tiny):
    merge.run(recipe(rounds=1, steps=1, models=[{"model": "e0"}, {"model": "e1"}]), "two", registry=registry)
    with pytest.raises(ZooError, match="list the same base and experts"):
        merge.run(recipe("two"), "p", registry=registry)
    with pytest.raises(ZooError, match="neither task_arithmetic, ties, tsv nor a registered merge"):
        merge.run(recipe("nothing-here"), "p", registry=registry)


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("lam", [1.0, 0.5])
def test_ties_directions_times_weights_are_the_ties_merge(normalize, lam):
    from zoo.merge.methods.ties import ties_directions
    from zoo.merge.state_dicts import merge_state_dicts

    g = torch.Generator().manual_seed(4)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}
    experts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    per_model = [{"weight": w, "density": d} for w, d in ((0.3, 0.5), (0.7, 0.4), (0.5, 1.0))]
    tvs = [{k: e[k] - base[k] for k in base} for e in experts]
    directions, weights = ties_directions(tvs, {k: per_model for k in base},
                                          {k: {"normalize": normalize, "lambda": lam} for k in base})
    expect = merge_state_dicts("ties", base, experts, per_model, normalize=normalize, **{"lambda": lam})
    for k in base:
        got = base[k] + sum(weights[k][t] * directions[t][k] for t in range(3))
        torch.testing.assert_close(got, expect[k])


def test_ties_start_is_the_ties_merge(registry, tiny):
    merge.run(merge.from_dict({"merge_method": "ties", "base_model": "base", "parameters": {"normalize": True},
                               "models": [{"model": f"e{i}", "parameters": {"density": 0.5, "weight": 0.3}}
                                          for i in range(3)]}),
              "ties", registry=registry)
    models = [{"model": f"e{i}", "parameters": {"density": 0.5}} for i in range(3)]
    by_name = merge.run(recipe("ties", rounds=1, steps=1, lr=1e-12), "p-name", registry=registry)
    by_method = merge.run(recipe("ties", models=models, rounds=1, steps=1, lr=1e-12, normalize=True), "p-method",
                          registry=registry)
    accuracy = {r["task"]: r["value"] for r in evaluate(registry, "ties", ["t0", "t1", "t2"], record=False)}
    for info in (by_name, by_method):
        start = [r for r in info["parity"] if r["round"] == 0]
        assert [r["accuracy"] for r in start] == pytest.approx([accuracy[r["task"]] for r in start])


def test_same_seed_same_bytes_other_seed_other_bytes(registry, tiny):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        merge.run(recipe(seed=seed, view="noise", rounds=1, steps=5, keep="last"), name, registry=registry)
    a, b, c = (weights(registry, n) for n in "abc")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)
    # the stored recipe (start and teachers pinned at their versions) makes it again
    stored = registry.show("a")["recipe"]
    merge.run(merge.from_dict({k: v for k, v in stored.items() if k not in ("learned", "artifacts")}), "d",
              registry=registry)
    d = weights(registry, "d")
    assert all(torch.equal(a[n], d[n]) for n in a)


def test_a_protected_teacher_labels_like_the_original(registry, tiny):
    """MergeLock keeps the function: the protected expert's labels, reliability and
    parity sets are the original's. With the hard-label loss alone the result is the
    same bytes; the KL terms see logits that differ by float rounding."""
    from zoo.protect.run import protect

    protect("e1", "e1-locked", registry=registry, seed=3)
    models = [{"model": "e0"}, {"model": "e1", "parameters": {"teacher": "e1-locked"}}, {"model": "e2"}]
    for loss in ({"agree_weight": 0.0}, {"agree_weight": 0.1, "kl_weight": 0.5}):
        tag = "hard" if loss["agree_weight"] == 0 else "kl"
        plain = merge.run(recipe(rounds=2, steps=10, **loss), f"{tag}-plain", registry=registry)
        locked = merge.run(recipe(models=models, rounds=2, steps=10, **loss), f"{tag}-locked", registry=registry)
        assert [(r["reliable"], r["parity"]) for r in locked["parity"]] == \
            [(r["reliable"], r["parity"]) for r in plain["parity"]]
        a, b = weights(registry, f"{tag}-plain"), weights(registry, f"{tag}-locked")
        if tag == "hard":
            assert all(torch.equal(a[n], b[n]) for n in a)
        else:
            for n in a:
                torch.testing.assert_close(b[n], a[n], rtol=1e-2, atol=1e-3)
    assert registry.show("hard-locked")["recipe"]["learned"]["teachers"] == ["e0@1", "e1-locked@1", "e2@1"]
    roles = [(p["role"], p["ref"]) for p in registry.show("hard-locked")["parents"]]
    assert roles == [("base", "base@1"), ("expert", "e0@1"), ("expert", "e1@1"), ("expert", "e2@1"),
                     ("teacher", "e1-locked@1")]


def test_a_teacher_with_other_labels_is_refused(registry, tiny, tmp_path):
    base, _ = tiny
    other = perturbed_expert(base, tmp_path / "other", LABELS[1], seed=7)
    cfg = json.loads((other / "config.json").read_text())
    cfg["id2label"] = {str(i): f"class-{i}" for i in range(LABELS[1])}
    cfg["label2id"] = {v: int(k) for k, v in cfg["id2label"].items()}
    (other / "config.json").write_text(json.dumps(cfg))
    # the expert names its labels too, differently
    e1 = tmp_path / "e1-named"
    import shutil

    shutil.copytree(tiny[1][1], e1)
    cfg1 = json.loads((e1 / "config.json").read_text())
    cfg1["id2label"] = {str(i): f"kind-{i}" for i in range(LABELS[1])}
    (e1 / "config.json").write_text(json.dumps(cfg1))
    models = [{"model": "e0"}, {"model": str(e1), "parameters": {"teacher": str(other), "task": "t1"}},
              {"model": "e2"}]
    with pytest.raises(ZooError, match="must share the head's label set"):
        merge.run(recipe(models=models), "p", registry=registry)
    assert not registry.has("p")


def test_cli_prints_the_table_and_refuses_bad_tau(zoo_cli, registry, tiny):
    rc, out, err = zoo_cli("merge", "--method", "parity", "--base", "base", "e0", "e1", "e2", "--param", "tau=0.05",
                           "--param", "view=none", "--param", "rounds=1", "--steps", "5", "--out", "p")
    assert rc == 0, err
    assert "PARITY SET" in out and "DISAGREE %" in out and "merged 3 model(s) with parity into p@1" in out
    rc, out, err = zoo_cli("merge", "--method", "parity", "--base", "base", "e0", "e1", "e2", "--param", "tau=2",
                           "--out", "q")
    assert rc == 1 and err.count("\n") == 1 and "tau" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parity_on_cuda_selects_as_on_the_cpu(registry, tiny):
    cpu = merge.run(recipe(rounds=2, steps=10, precision="fp32"), "p-cpu", registry=registry, device="cpu")
    gpu = merge.run(recipe(rounds=2, steps=10, precision="fp32"), "p-gpu", registry=registry, device="cuda")
    first = [(r["reliable"], r["parity"]) for r in cpu["parity"] if r["round"] == 0]
    assert first == [(r["reliable"], r["parity"]) for r in gpu["parity"] if r["round"] == 0]
    assert average(final(gpu["parity"]), "disagreement") < average(
        [r for r in gpu["parity"] if r["round"] == 0], "disagreement")


def test_end_to_end_with_the_default_reliability_filter(registry, tiny, tmp_path):
    """The default filter (tau 0.9, view auto: Gaussian noise at 0.1 × the input's std),
    not the loosened tau=0.05, view=none of the tests above. The tiny experts' heads are
    sharpened (× 40) so that they are confident, as trained experts are; the filter then
    keeps a real share of each pool, drops the rest, and levelling lowers the disagreement."""
    from transformers import ViTForImageClassification

    for i in range(len(LABELS)):
        m = ViTForImageClassification.from_pretrained(tiny[1][i])
        with torch.no_grad():
            m.classifier.weight.mul_(40)
            m.classifier.bias.mul_(40)
        m.save_pretrained(tmp_path / f"sharp{i}")
        registry.add(tmp_path / f"sharp{i}", f"s{i}", "expert", base="base", tasks=[f"t{i}"])
    models = [{"model": f"s{i}"} for i in range(len(LABELS))]
    rec = merge.from_dict({"merge_method": "parity", "base_model": "base", "seed": 0, "models": models,
                           "parameters": {"rounds": 2, "steps": 20}})
    defaults = get_method("parity").parameters
    assert defaults["tau"].default == 0.9 and defaults["view"].default == "auto"
    info = merge.run(rec, "p", registry=registry)
    learned = registry.show("p")["recipe"]["learned"]
    assert learned["tau"] == 0.9 and learned["view"] == "auto"
    start = [r for r in info["parity"] if r["round"] == 0]
    for r in start:  # every task keeps some reliable samples
        assert 0 < r["reliable"] <= r["pool"] and r["parity"] <= r["reliable"]
    assert sum(r["reliable"] for r in start) < sum(r["pool"] for r in start)  # and the filter drops some
    assert sum(r["parity"] for r in start) > 0  # and the merge disagrees with the experts on some of them
    assert average(final(info["parity"]), "disagreement") < average(start, "disagreement")
