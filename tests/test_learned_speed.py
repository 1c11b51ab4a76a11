"""The learned merges' fast paths give what the plain ones give: the fused mask chain's
gradients against autograd's, one body pass over every task's batch against one pass
per task, losses read back every few steps against every step; and the mask statistics
the Concrete merges record and print."""

from __future__ import annotations

import math

import pytest
import torch

import zoo.merge as merge
from conftest import LABELS, vit
from zoo import open_checkpoint
from zoo.errors import ZooError
from zoo.merge.learned import train
from zoo.merge.learned.merger import MaskSample, Merger, mask_stats
from zoo.merge.learned.runtime import build_body, make_forward
from zoo.merge.methods import get_method


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(5, 4, generator=g), "b": torch.randn(4, generator=g), "v": torch.randn(3, 4, generator=g)}
    tvs = [{k: 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    return base, tvs


def loss_of(params: dict[str, torch.Tensor]) -> torch.Tensor:
    x = torch.linspace(-1, 1, 4)
    return ((params["w"] @ x).tanh().sum() + (params["v"] @ params["b"]).sin().sum()) ** 2


# -- the fused mask chain ----------------------------------------------------------------------------
@pytest.mark.parametrize("coefficients,clamp", [("layer", False), ("task", False), ("layer", True)])
def test_fused_gradients_equal_autograds_through_the_plain_chain(coefficients, clamp):
    """The same draw, once through the one-node merge and once as a mask with its own
    graph (autograd through σ, the rescale and θ₀ + m ⊙ Σ wτ): the same loss, and the
    same gradients to the coefficients and the mask logits."""
    base, tvs = problem()
    grads = {}
    for how in ("fused", "autograd"):
        merger = Merger(base, tvs, coefficients=coefficients, init=0.3, clamp=clamp, mask="^(w|b)$")
        with torch.no_grad():
            merger.weights.add_(0.8 * torch.randn(merger.weights.shape, generator=torch.Generator().manual_seed(1)))
            merger.logit_flat.copy_(torch.randn(merger.logit_flat.shape, generator=torch.Generator().manual_seed(2)))
        draw = merger.sample(torch.Generator().manual_seed(3))
        mask = draw if how == "fused" else MaskSample(draw.values)
        loss = loss_of(merger.merged(mask))
        loss.backward()
        grads[how] = (float(loss.detach()), merger.weights.grad.clone(), merger.logit_flat.grad.clone())
    (la, wa, xa), (lb, wb, xb) = grads["fused"], grads["autograd"]
    assert la == pytest.approx(lb, rel=1e-6)
    torch.testing.assert_close(wa, wb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(xa, xb, rtol=1e-5, atol=1e-6)
    if clamp:
        assert (wa == 0).any()  # coefficients pushed outside [0, 1] get no gradient


def test_a_detached_draw_trains_the_coefficients_only():
    base, tvs = problem()
    merger = Merger(base, tvs, coefficients="layer", mask=".*")
    draw = merger.sample(torch.Generator().manual_seed(0))
    loss_of(merger.merged(draw.detach())).backward()
    assert merger.logit_flat.grad is None and merger.weights.grad.abs().sum() > 0
    torch.testing.assert_close(draw.detach().flat, draw.flat.detach())


def test_fixed_coefficients_let_go_of_the_task_vectors_and_merge_the_same():
    base, tvs = problem()
    merger = Merger(base, tvs, coefficients="fixed", mask=".*")
    draw = merger.sample(torch.Generator().manual_seed(0))
    before = {n: t.detach().clone() for n, t in merger.merged(draw).items()}
    merger.release_task_vectors()
    assert merger.tv_flat is None
    after = merger.merged(draw)
    assert all(torch.equal(before[n], after[n]) for n in before)
    with pytest.raises(ZooError, match="fixed"):
        Merger(base, tvs, coefficients="task").release_task_vectors()


# -- one body pass for every task -----------------------------------------------------------------------
def test_one_body_pass_gives_each_tasks_logits_and_gradients(tmp_path):
    """A tiny ViT, three heads of different widths: the joint pass's logits and its
    gradients to the body are the per-task passes' up to float rounding."""
    ck = open_checkpoint(vit(tmp_path / "base"))
    body = build_body(ck, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    heads = [{"classifier.weight": torch.randn(k, 32, generator=g), "classifier.bias": torch.randn(k, generator=g)}
             for k in LABELS]
    forward = make_forward(body, heads)
    batches = [{"pixel_values": torch.randn(4 + t, 1, 8, 8, generator=g)} for t in range(len(LABELS))]
    results = []
    for joint in (True, False):
        params = {n: ck.read_tensor(n).float().requires_grad_(True) for n in ck.tensors
                  if not n.startswith("classifier")}
        logits = forward.all(params, batches) if joint else [forward(t, params, b) for t, b in enumerate(batches)]
        assert logits is not None
        sum(train.entropy(x) for x in logits).backward()
        results.append((logits, {n: p.grad for n, p in params.items()}))
    (la, ga), (lb, gb) = results
    assert [x.shape for x in la] == [(4 + t, k) for t, k in enumerate(LABELS)]
    for a, b in zip(la, lb):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    for n in ga:
        torch.testing.assert_close(ga[n], gb[n], rtol=1e-3, atol=1e-5)
    # a subset of tasks, in any order
    sub = forward.all({n: ck.read_tensor(n) for n in ck.tensors}, [batches[2], batches[0]], [2, 0])
    torch.testing.assert_close(sub[0], lb[2].detach(), rtol=1e-4, atol=1e-5)
    # inputs that do not stack (other shapes): None, and the caller runs the tasks one by one
    odd = [batches[0], {"pixel_values": torch.randn(2, 1, 8, 8)[:, :, :4]}]
    assert forward.all({}, odd) is None


def test_losses_are_read_back_every_few_steps_with_the_same_history():
    """Every step's loss is in the history, as the value it had at its step; the report
    comes at step 1, every ``LOG_EVERY`` steps and the last."""
    base, tvs = problem()
    data = [train.TaskData(f"t{i}", {"x": torch.randn(8, 4, generator=torch.Generator().manual_seed(i))})
            for i in range(3)]

    def forward(t, params, batch):
        return batch["x"] @ params["w"].T

    reports = []
    m = get_method("adamerging")
    s = m.settings({"steps": 23, "batch_size": 4, "coefficients": "task"})
    result = m.fit(s.merger(base, tvs, "cpu"), forward, data, s, lambda *a: reports.append(a[0]))
    assert [h["step"] for h in result.history] == list(range(1, 24))
    assert reports == [1, 10, 20, 23]
    # the same run, read back at every step through ``Loop.loss``
    merger = s.merger(base, tvs, "cpu")
    loop = train.Loop(merger, forward, data, s)
    opt = train.adam([merger.weights], s.lr)
    values = []
    for step in range(1, 24):
        loss, value = loop.loss(merger.merged(), step)
        opt.zero_grad()
        loss.backward()
        opt.step()
        values.append(value)
    assert [h["loss"] for h in result.history] == values


# -- the mask's statistics -----------------------------------------------------------------------------
def test_mask_stats_are_the_documented_definitions():
    logits = {"a": torch.tensor([0.0, 2.0]), "b": torch.tensor([[-2.0, 10.0]])}
    p = torch.sigmoid(torch.tensor([0.0, 2.0, -2.0, 10.0]))
    stats = mask_stats(logits)
    assert stats["above_half"] == 0.5  # σ(0) = ½ is not above ½
    assert stats["binariness"] == pytest.approx(float((2 * p - 1).abs().mean()))
    assert stats["mean_keep"] == pytest.approx(float(p.mean()))
    assert stats["mean_abs_logit"] == pytest.approx(3.5)
    assert mask_stats({"a": torch.zeros(3)})["binariness"] == 0.0


def test_a_concrete_merge_records_its_mask_and_zoo_show_prints_it(zoo_cli, registry, tiny):
    rc, out, err = zoo_cli("merge", "--method", "concrete_ta", "--base", "base", "e0", "e1", "e2", "--steps", "3",
                           "--param", "lr=0.5", "--out", "cta")
    assert rc == 0, err
    learned = registry.show("cta")["recipe"]["learned"]
    stats = learned["mask_stats"]
    assert 0 <= stats["above_half"] <= 1 and 0 < stats["binariness"] < 1
    assert f"mask: {100 * stats['above_half']:.1f}% of entries above ½" in err  # zoo merge says so too
    rc, out, err = zoo_cli("show", "cta")
    assert rc == 0, err
    line = next(x for x in out.splitlines() if x.strip().startswith("mask:"))
    assert f"{100 * stats['above_half']:.1f}% of entries above ½" in line and f"{stats['binariness']:.3f}" in line
    info = merge.run(merge.from_dict({"merge_method": "adamerging", "base_model": "base", "parameters": {"steps": 2},
                                      "models": [{"model": f"e{i}"} for i in range(len(LABELS))]}),
                     "am", registry=registry)
    assert "mask_stats" not in registry.show(info["ref"])["recipe"]["learned"]


def test_the_demo_table_shows_the_mask_beside_each_concrete_row():
    from zoo.cli.demo import mask_columns

    table = [{"method": "task arithmetic", "avg": "71.1"}, {"method": "Concrete TA, entropy", "avg": "62.2"}]
    masks = [{"method": "Concrete TA, entropy", "above_half": 0.4321, "binariness": 0.1234}]
    rows = mask_columns(table, masks)
    assert rows[0]["above_half"] == "" and rows[0]["binariness"] == ""
    assert rows[1]["above_half"] == "43.2" and rows[1]["binariness"] == "0.12"
    assert math.isclose(float(rows[1]["avg"]), 62.2)
