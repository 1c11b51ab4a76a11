"""The learned merges against answers worked out by hand and against the reference
implementations' order of operations (fusion_bench, EnnengYang/AdaMerging): known
answers per method, Concrete AdaMerging's stage-1 order, clamping, AdaMerging++'s
whole-model trim, the final mask, temperature calibration against scipy, and
autograd against finite differences.

The model is a linear classifier, logits = x · Wᵀ, small enough that each answer can
be written down."""

from __future__ import annotations

import math

import pytest
import torch

from zoo.errors import ZooError
from zoo.merge.learned.merger import MaskSample, Merger, load_mask, rescale, save_mask
from zoo.merge.learned.objectives import entropy
from zoo.merge.learned.train import Loop, TaskData, adam, fit_temperature
from zoo.merge.methods import get_method
from zoo.merge.methods.adamerging import ties_prestep


def linear(task: int, params: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["x"] @ params["w"].T


def learn(method: str, base, tvs, data, **options):
    """Run ``method``'s own loop (its defaults under ``options``) on the linear model."""
    m = get_method(method)
    s = m.settings(options)
    merger = s.merger(base, tvs, "cpu")
    return m.fit(merger, linear, data, s), merger, s


def ones(n: int, labels: list[int] | None = None) -> TaskData:
    """n copies of the input x = [1]; with ``labels``, those labels cycled."""
    y = torch.tensor([labels[i % len(labels)] for i in range(n)]) if labels else None
    return TaskData("t", {"x": torch.ones(n, 1)}, y)


# -- known answers ---------------------------------------------------------------------------------
@pytest.mark.parametrize("coefficients", ["task", "layer"])
def test_adamerging_ce_finds_the_coefficient_that_balances_the_labels(coefficients):
    """Base logits (1, 0), task vector (-1, 0): the logits differ by 1 - λ. Half the labels
    are 0 and half 1, so cross-entropy is least where both classes are equally likely:
    λ = 1."""
    base = {"w": torch.tensor([[1.0], [0.0]])}
    tvs = [{"w": torch.tensor([[-1.0], [0.0]])}]
    result, merger, _ = learn("adamerging", base, tvs, [ones(8, [0, 1])], objective="ce", steps=300, lr=0.05,
                              batch_size=8, coefficients=coefficients)
    assert result.coefficients[0][0] == pytest.approx(1.0, abs=1e-2)
    assert result.merged["w"][0, 0] == pytest.approx(0.0, abs=1e-2)


def test_adamerging_entropy_first_step_moves_by_lr_the_way_entropy_falls():
    """At λ = 0.3 the logits differ by 0.7; entropy falls as the gap grows, and the gap
    grows as λ falls. Adam's first step is lr·g/(|g| + eps): λ = 0.3 - lr."""
    base = {"w": torch.tensor([[1.0], [0.0]])}
    tvs = [{"w": torch.tensor([[-1.0], [0.0]])}]
    result, _, _ = learn("adamerging", base, tvs, [ones(4)], steps=1, lr=0.01, batch_size=4, coefficients="task")
    assert result.coefficients[0][0] == pytest.approx(0.3 - 0.01, abs=1e-6)


def two_logits():
    """Base W = 0, one task vector adding 1 to both logits: with the mask m rescaled
    by its mean, the logits are λ·(m₀, m₁)/mean(m), and labels 0 want m₀ up, m₁ down."""
    return {"w": torch.zeros(2, 1)}, [{"w": torch.ones(2, 1)}]


@pytest.mark.parametrize("final_mask", ["relaxed", "bernoulli"])
def test_concrete_ta_learns_to_keep_the_helpful_element_and_drop_the_other(final_mask):
    base, tvs = two_logits()
    result, merger, s = learn("concrete_ta", base, tvs, [ones(8, [0])], objective="ce", steps=150, lr=0.1,
                              batch_size=8, final_mask=final_mask)
    logits = result.mask_logits["w"].reshape(-1)
    assert logits[0] > 2 and logits[1] < -2
    drawn = result.mask_bits["w"]
    if final_mask == "bernoulli":
        assert set(drawn.reshape(-1).tolist()) <= {0.0, 1.0}
    else:
        assert ((drawn > 0) & (drawn < 1)).all()  # a relaxed draw: continuous values
    # the saved merge is θ₀ + λ · m / mean(m) · τ, with that very draw
    expect = base["w"] + 0.3 * (drawn / drawn.mean()) * tvs[0]["w"]
    assert torch.allclose(result.merged["w"], expect, atol=1e-6)
    assert result.merged["w"][0, 0] > result.merged["w"][1, 0]


def test_concrete_adamerging_learns_the_mask_then_raises_the_coefficient():
    """Same problem: stage 1 learns m₀ > m₁; stage 2 then raises λ (a larger gap
    m₀ - m₁ scaled by λ only lowers the cross-entropy of labels 0). A small inner lr
    keeps λ positive in stage 1 (at the default lr 1 an inner step can flip its sign, and
    the mask then learns the mirror image, m₁ > m₀ with λ < 0: the same merge)."""
    base, tvs = two_logits()
    result, _, _ = learn("concrete_adamerging", base, tvs, [ones(8, [0])], objective="ce", steps=100,
                         stage2_steps=50, lr=0.1, inner_lr=0.01, batch_size=8, coefficients="task")
    logits = result.mask_logits["w"].reshape(-1)
    assert logits[0] > logits[1]
    drawn = result.mask_bits["w"]
    lam = result.coefficients[0][0]
    assert lam > 0.3
    assert torch.allclose(result.merged["w"], lam * (drawn / drawn.mean()) * tvs[0]["w"], atol=1e-6)


# -- Concrete AdaMerging's stage 1 -------------------------------------------------------------------
def small_problem():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(3, 4, generator=g), "b": torch.randn(3, 4, generator=g)}
    tvs = [{k: 0.5 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    data = [TaskData(f"t{i}", {"x": torch.randn(12, 4, generator=g)}) for i in range(2)]
    return base, tvs, data


def forward2(task, params, batch):
    return torch.tanh(batch["x"] @ params["w"].T) @ params["b"]


def reference_stage1(merger: Merger, data, s, order: str) -> tuple[torch.Tensor, list[float]]:
    """Stage 1 as fusion_bench writes it (``reference``): merge the weights with the
    coefficients as they are, *then* assign the initial value to ``.data``, take the
    inner loss and gradient on that cached merge and step; or reset first."""
    loop = Loop(merger, forward2, data, s)
    init = merger.weights.detach().clone()
    inner, outer = adam([merger.weights], s.inner_lr), adam([merger.logit_flat], s.lr)
    losses = []
    for step in range(1, s.steps + 1):
        if order == "reset_first":
            merger.weights.data = init.clone()
        sample = merger.sample(loop.noise)
        cached = merger.merged(MaskSample({n: v.detach() for n, v in sample.values.items()}))
        merger.weights.data = init.clone()  # fusion_bench: after merge_weights, before the loss
        loss, _ = loop.loss(cached, step)
        inner.zero_grad()
        loss.backward()
        inner.step()
        loss_m, value = loop.loss(merger.merged(sample), step)
        outer.zero_grad()
        loss_m.backward()
        outer.step()
        losses.append(value)
    return merger.logit_flat.detach().clone(), losses


@pytest.mark.parametrize("order", ["reference", "reset_first"])
def test_stage1_follows_the_reference_order_bit_for_bit(order):
    base, tvs, data = small_problem()
    method = get_method("concrete_adamerging")
    opts = {"steps": 6, "stage2_steps": 0, "lr": 0.05, "batch_size": 4, "stage1_order": order}
    s = method.settings(opts)
    result = method.fit(s.merger(base, tvs, "cpu"), forward2, data, s)
    logits, losses = reference_stage1(s.merger(base, tvs, "cpu"), data, s, order)
    assert torch.equal(torch.cat([result.mask_logits[n].reshape(-1) for n in ("w", "b")]), logits)
    assert [h["loss"] for h in result.history] == losses


def test_the_two_stage1_orders_agree_on_step_one_and_then_differ():
    base, tvs, data = small_problem()
    method = get_method("concrete_adamerging")
    runs = {}
    for order in ("reference", "reset_first"):
        s = method.settings({"steps": 4, "stage2_steps": 0, "lr": 0.05, "batch_size": 4, "stage1_order": order})
        runs[order] = method.fit(s.merger(base, tvs, "cpu"), forward2, data, s)
    a, b = ([h["loss"] for h in runs[o].history] for o in ("reference", "reset_first"))
    assert a[0] == b[0] and a[1:] != b[1:]
    assert method.parameters["stage1_order"].default == "reference"


def test_a_bad_stage1_order_or_final_mask_is_one_line():
    method = get_method("concrete_adamerging")
    assert method.parameters["stage1_order"].check("zoo") is not None
    assert get_method("concrete_ta").parameters["final_mask"].check("binary") is not None
    merger = Merger(*two_logits(), mask=".*")
    with pytest.raises(ZooError, match="final_mask"):
        merger.draw_final("binary", torch.Generator())


# -- clamping -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("clamp", [True, False])
def test_clamp_holds_the_coefficient_in_the_unit_interval_in_the_forward(clamp):
    """Labels 0 and a task vector that raises logit 0: cross-entropy always wants a larger
    λ. From 0.9 with lr 0.1, clamping holds the merge at λ = 1 exactly; without it λ > 1."""
    base = {"w": torch.zeros(2, 1)}
    tvs = [{"w": torch.tensor([[1.0], [0.0]])}]
    result, merger, _ = learn("adamerging", base, tvs, [ones(4, [0])], objective="ce", steps=5, lr=0.1,
                              batch_size=4, coefficients="task", init=0.9, clamp=clamp)
    if clamp:
        assert result.merged["w"][0, 0] == 1.0 and result.coefficients == [[1.0]]
        assert float(merger.weights.detach()) > 1  # the raw parameter moves on; the forward clamps it
    else:
        assert result.coefficients[0][0] > 1.05 and result.merged["w"][0, 0] == pytest.approx(
            result.coefficients[0][0])
    assert get_method("adamerging").parameters["clamp"].default is False  # as fusion_bench's configs


# -- AdaMerging++ over the whole model ---------------------------------------------------------------------
def reference_adamerging_pp(tvs: list[dict[str, torch.Tensor]], k: float) -> list[dict[str, torch.Tensor]]:
    """EnnengYang/AdaMerging's pre-step, written from its description: flatten each task
    vector (keys sorted), keep |x| ≥ its (d - int(d·K))-th smallest magnitude, elect signs
    by the summed mass (a zero sum takes the majority sign), keep the agreeing entries."""
    keys = sorted(tvs[0])
    flat = torch.stack([torch.cat([tv[n].reshape(-1) for n in keys]) for tv in tvs])
    d = flat.shape[1]
    kth = flat.abs().kthvalue(d - int(d * k), dim=1, keepdim=True).values
    trimmed = flat * (flat.abs() >= kth)
    sign = torch.sign(trimmed.sum(dim=0))
    sign[sign == 0] = torch.sign(sign.sum())
    kept = trimmed * torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)
    out = []
    for row in kept:
        parts = row.split([tvs[0][n].numel() for n in keys])
        out.append({n: p.view(tvs[0][n].shape) for n, p in zip(keys, parts)})
    return out


def test_adamerging_pp_trims_over_the_whole_model_as_the_reference():
    g = torch.Generator().manual_seed(3)
    # tensors of very different scales: a whole-model trim keeps mostly the large one
    tvs = [{"big": 10 * torch.randn(6, 5, generator=g), "small": 0.1 * torch.randn(40, generator=g),
            "zero": torch.zeros(3)} for _ in range(3)]
    got = ties_prestep(tvs, 0.2)
    expect = reference_adamerging_pp(tvs, 0.2)
    for a, b in zip(got, expect):
        for n in tvs[0]:
            assert torch.equal(a[n], b[n]), n
    assert all((o["small"] == 0).all() for o in got)  # the per-tensor trim would keep 8 of each
    per_tensor = ties_prestep(tvs, 0.2, "per_tensor")
    assert all((o["small"] != 0).sum() > 0 for o in per_tensor)
    assert get_method("adamerging").parameters["ties_trim"].default == "global"


def test_adamerging_pp_zero_sums_take_the_majority_sign():
    # one entry whose trimmed values cancel exactly; the other entries elect +
    tvs = [{"w": torch.tensor([2.0, 3.0, 4.0, 1.0])}, {"w": torch.tensor([-2.0, 3.0, 4.0, 1.0])}]
    got = ties_prestep(tvs, 1.0)
    expect = reference_adamerging_pp(tvs, 0.999)  # K < 1 keeps everything here too
    assert [torch.equal(a["w"], b["w"]) for a, b in zip(got, expect)] == [True, True]
    assert got[0]["w"][0] == 2 and got[1]["w"][0] == 0


# -- the final mask --------------------------------------------------------------------------------------
def test_the_relaxed_final_mask_is_stored_exactly_and_the_bits_still_load(tmp_path):
    merger = Merger({"w": torch.zeros(3, 5)}, [{"w": torch.ones(3, 5)}], mask=".*")
    relaxed = merger.draw_relaxed(torch.Generator().manual_seed(0))
    save_mask(relaxed, merger.logits_dict(), tmp_path / "r.safetensors")
    back, logits = load_mask(tmp_path / "r.safetensors")
    assert torch.equal(back["w"], relaxed["w"]) and set(logits) == {"w"}
    bits = merger.draw_bits(torch.Generator().manual_seed(0))
    save_mask(bits, merger.logits_dict(), tmp_path / "b.safetensors")
    assert torch.equal(load_mask(tmp_path / "b.safetensors")[0]["w"], bits["w"])
    assert (tmp_path / "b.safetensors").stat().st_size < (tmp_path / "r.safetensors").stat().st_size


def test_a_relaxed_draw_is_a_training_sample_before_its_rescale():
    merger = Merger({"w": torch.zeros(4, 4)}, [{"w": torch.ones(4, 4)}], mask=".*")
    with torch.no_grad():
        merger.logit_flat.copy_(torch.linspace(-2, 2, 16))
    drawn = merger.draw_relaxed(torch.Generator().manual_seed(5))
    sample = merger.sample(torch.Generator().manual_seed(5))
    assert torch.allclose(rescale(drawn).values["w"], sample.values["w"], atol=1e-6)


# -- calibration -------------------------------------------------------------------------------------------
def test_fitted_temperature_is_scipys_optimum():
    import numpy as np
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(200, 5, generator=g)
    labels = torch.where(torch.rand(200, generator=g) < 0.7, logits.argmax(1), torch.randint(0, 5, (200,),
                                                                                                generator=g))
    x, y = logits.double().numpy(), labels.numpy()

    def nll(log_t: float) -> float:
        return float(-log_softmax(x / math.exp(log_t), axis=1)[np.arange(len(y)), y].mean())
    best = math.exp(minimize_scalar(nll, bounds=(-5, 5), method="bounded", options={"xatol": 1e-10}).x)
    assert fit_temperature(logits, labels) == pytest.approx(best, rel=1e-3)


# -- gradients -------------------------------------------------------------------------------------------
def test_autograd_gradients_match_finite_differences():
    """The entropy loss through a masked, layer-wise merge: d/d(coefficients) and
    d/d(mask logits), against central differences in float64 arithmetic on the same draw."""
    base, tvs, data = small_problem()
    merger = Merger(base, tvs, coefficients="layer", init=0.3, mask="^w$")
    with torch.no_grad():
        merger.weights.add_(0.1 * torch.randn(merger.weights.shape, generator=torch.Generator().manual_seed(1)))
        merger.logit_flat.copy_(torch.randn(merger.logit_flat.shape, generator=torch.Generator().manual_seed(2)))
    x = data[0].inputs["x"]

    def loss() -> torch.Tensor:
        sample = merger.sample(torch.Generator().manual_seed(7))  # the same noise every call
        return entropy(forward2(0, merger.merged(sample), {"x": x}))

    merger.zero_grad()
    loss().backward()
    for param in (merger.weights, merger.logit_flat):
        grad = param.grad.detach().clone().reshape(-1)
        flat = param.data.reshape(-1)
        for i in range(0, flat.numel(), max(1, flat.numel() // 6)):
            old = float(flat[i])
            eps = 1e-2
            with torch.no_grad():
                flat[i] = old + eps
                up = float(loss())
                flat[i] = old - eps
                down = float(loss())
                flat[i] = old
            numeric = (up - down) / (2 * eps)
            assert grad[i].item() == pytest.approx(numeric, rel=2e-2, abs=2e-4), (param.shape, i)
