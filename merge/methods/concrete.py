"""Concrete subspace learning: a shared Concrete (RelaxedBernoulli) mask over the task
vectors, learned with fixed coefficients (Concrete TA) or alternating with them and
then AdaMerging inside the frozen mask (Concrete AdaMerging)."""

from __future__ import annotations

from zoo.merge.learned.merger import FINAL_MASKS, mask_stats, rescale
from zoo.merge.learned.train import Loop, adam
from zoo.merge.methods.base import register
from zoo.merge.methods.learned import COEF, COMMON, MASK, LearnedMethod
from zoo.merge.methods.params import Param, check_choice, check_non_negative_int, check_number, check_positive, \
    check_positive_int

CONCRETE_REFERENCE = ('Tang et al., "Concrete Subspace Learning based Interference Elimination for Multi-task '
                      'Model Fusion", arXiv 2312.06173')


# The mask the saved model folds in: fusion_bench's ``eval_mask_type`` (default continuous).
FINAL_MASK = {"final_mask": Param("relaxed", check_choice(*FINAL_MASKS),
                                  "the mask draw folded into the saved model: relaxed (one RelaxedBernoulli draw at "
                                  "temperature, fusion_bench's default) or bernoulli (one binary draw)")}
# Concrete AdaMerging's stage-1 inner step: where its gradient is taken.
STAGE1_ORDERS = ("reference", "reset_first")


class ConcreteMethod(LearnedMethod):
    """A learned merge with a shared Concrete mask over the task vectors."""

    reference = CONCRETE_REFERENCE

    def start_directions(self, source):
        return source.task_vectors, self.option(source.global_parameters, "mask")

    def learn(self, inputs):
        result, used = super().learn(inputs)
        if result.mask_logits:  # is the learned mask a subspace, or a soft re-weighting?
            stats = used["mask_stats"] = {k: round(v, 6) for k, v in mask_stats(result.mask_logits).items()}
            if inputs.log is not None:
                inputs.log(f"mask: {100 * stats['above_half']:.1f}% of entries above ½ (keep probability), "
                           f"binariness {stats['binariness']:.3f} (0: a soft re-weighting, 1: a fixed subspace)")
        return result, used

    def recorded(self, options, s):
        # which draw the saved model folds in (the mask artifact holds that very draw)
        out = {"final_mask": s.final_mask}
        if s.stage1_order is not None:
            out["stage1_order"] = s.stage1_order
        return out


@register
class ConcreteTA(ConcreteMethod):
    """Concrete task arithmetic: one shared Concrete mask over the task vectors, coefficients fixed at ``init``."""

    name = "concrete_ta"
    parameters = {**COMMON, **MASK, **FINAL_MASK, "init": Param(0.3, check_number, "the fixed coefficient λ"),
                  "steps": Param(2000, check_positive_int, "optimisation steps")}
    fixed_settings = {"coefficients": "fixed"}  # the coefficients stay at init (λ); only the mask learns

    def fit(self, merger, forward, data, s, report=None):
        loop = Loop(merger, forward, data, s, report)
        merger.release_task_vectors()  # the coefficients are fixed: Σᵢ λτᵢ is all the merge needs
        opt = adam([merger.logit_flat], s.lr)
        for step in range(1, s.steps + 1):
            loss = loop.objective(merger.merged(merger.sample(loop.noise)))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            loss = loop.sync.reduce(opt, loss)
            opt.step()
            loop.tick(step, s.steps, loss)
        drawn = merger.draw_final(s.final_mask or "relaxed", loop.noise)
        return loop.result(rescale(drawn), drawn)


@register
class ConcreteAdaMerging(ConcreteMethod):
    """Concrete AdaMerging: learn a shared mask alternating with the coefficients, then AdaMerging inside it.

    Stage 1 alternates coefficient and mask steps; stage 2 freezes one mask draw and
    runs AdaMerging inside it.
    """

    name = "concrete_adamerging"
    parameters = {**COMMON, **COEF, **MASK, **FINAL_MASK,
                  "steps": Param(1000, check_positive_int, "stage-1 (mask) steps"),
                  "stage2_steps": Param(1000, check_non_negative_int, "stage-2 (AdaMerging in the frozen mask) steps"),
                  "inner_lr": Param(1.0, check_positive, "stage-1 inner learning rate of the coefficients"),
                  "stage1_order": Param("reference", check_choice(*STAGE1_ORDERS),
                                        "stage-1 inner step: reference (gradient at the previous step's adapted "
                                        "coefficients, then reset to init and step, as fusion_bench) or "
                                        "reset_first (reset to init, then gradient and step)")}

    def fit(self, merger, forward, data, s, report=None):
        loop = Loop(merger, forward, data, s, report)
        # Stage 1: alternate one inner Adam step on the coefficients (state kept) on a
        # detached mask sample, and one Adam step on the mask logits through the same
        # sample; first order only (arXiv 2312.06173). fusion_bench merges with the
        # previous step's adapted coefficients, takes the inner gradient there, and only
        # then resets them to init, so the Adam step starts from init (``reference``);
        # ``reset_first`` resets before the gradient, zoo's earlier order.
        order = s.stage1_order or "reference"
        inner = adam([merger.weights], s.inner_lr)
        outer = adam([merger.logit_flat], s.lr)
        total = s.steps + s.stage2_steps
        for step in range(1, s.steps + 1):
            if order == "reset_first":
                merger.reset_coefficients()
            sample = merger.sample(loop.noise)
            loss_w = loop.objective(merger.merged(sample.detach()))
            inner.zero_grad(set_to_none=True)
            loss_w.backward()
            loop.sync.reduce(inner, loss_w)
            if order == "reference":
                merger.reset_coefficients()
            inner.step()
            loss_m = loop.objective(merger.merged(sample))
            outer.zero_grad(set_to_none=True)
            merger.weights.grad = None
            loss_m.backward()
            loss_m = loop.sync.reduce(outer, loss_m)
            outer.step()
            loop.tick(step, total, loss_m, stage=1)
        # Stage 2: freeze one mask draw; AdaMerging inside it from the initial coefficients.
        drawn = merger.draw_final(s.final_mask or "relaxed", loop.noise)
        final_mask = rescale(drawn)
        merger.reset_coefficients()
        opt = adam([merger.weights], s.lr)
        for step in range(s.steps + 1, total + 1):
            loss = loop.objective(merger.merged(final_mask))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            loss = loop.sync.reduce(opt, loss)
            opt.step()
            loop.tick(step, total, loss, stage=2)
        return loop.result(final_mask, drawn)
