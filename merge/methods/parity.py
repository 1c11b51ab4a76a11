"""Parity distillation (after MPA): the experts label their own tasks' unlabeled pools,
and the merge trains only where an expert is reliable and the merge disagrees,
re-selecting those samples each round. The loop is ``merge.learned.parity.distill``."""

from __future__ import annotations

import dataclasses
from typing import Any

from zoo.errors import ZooError
from zoo.registry.records import Measurement

from zoo.merge.learned.generative_parity import distill_generative, gen_tasks
from zoo.merge.learned.merger import Merger
from zoo.merge.learned.parity import TRAINABLE, VIEWS, ParitySettings, distill
from zoo.merge.methods.base import register
from zoo.merge.methods.learned import COMMON, MODEL, LearnedMethod
from zoo.merge.methods.params import (Param, check_bool, check_choice, check_density, check_number, check_positive,
                                      check_positive_int, check_regex, check_string)


def check_tau(v: Any) -> str | None:
    """A confidence in (0, 1]."""
    return check_number(v) or (None if 0 < v <= 1 else "must be in (0, 1]: the confidence an expert needs for its "
                                                        "label to count")


def check_trainable(v: Any) -> str | None:
    """One or more of TRAINABLE, comma-separated."""
    parts = [x.strip() for x in str(v).split(",")] if isinstance(v, str) else []
    return None if parts and all(x in TRAINABLE for x in parts) else \
        f"must be one or more of {', '.join(TRAINABLE)}, comma-separated"


# A generated answer's mean token confidence runs lower than a classifier's top
# probability (a sure answer of ten tokens averages its least sure ones in); on the LLM
# demo's val prompts, 0.9 kept a quarter of the sort and count experts' answers
# (97-100% right), 0.7 kept 85-96% of them without the sampled view (62-98% right).
GENERATIVE_TAU = 0.7


@register
class Parity(LearnedMethod):
    """Parity distillation: the merge trains where a reliable expert and the merge disagree.

    The experts label their own tasks' unlabeled pools; the merge trains only where an
    expert is reliable and the merge disagrees, re-selecting those samples each round.
    """

    name = "parity"
    reference = ('Model Parity Aligner (MPA), arXiv 2509.16633, EMNLP 2025, adapted from aligning a model with '
                 'its teacher to levelling a merge against its experts')
    parameters = {
        "start": Param("task_arithmetic", check_string, "the merge to start from: task_arithmetic, ties (with this "
                                                        "recipe's weights and densities) or a registered merge"),
        "train": Param("coefficients", check_trainable, "what trains: coefficients, mask, params (comma-separated)"),
        "coefficients": Param("layer", check_choice("task", "layer"), "coefficient scope when they train"),
        "mask": Param(".*", check_regex, "train mask: regex of the masked tensors (a Concrete start keeps its own)"),
        "temperature": Param(0.5, check_positive, "Concrete (RelaxedBernoulli) temperature"),
        "params": Param(r"norm|\.bias$", check_regex,
                        "train params: regex of the tensors that get a trained offset"),
        "tau": Param(0.9, check_tau, "reliability: the expert's confidence at least tau (generative tasks: "
                                     "default 0.7, on the mean token confidence)"),
        "view": Param("auto", check_choice(*VIEWS),
                      "second weak view for the reliability check (auto: noise on float inputs, drop "
                      "tokens, sample generated answers; shift: move images by a pixel; sample: a second, "
                      "sampled decode)"),
        "view_strength": Param(0.1, check_positive,
                               "noise std as a fraction of the input's, or the dropped token fraction"),
        "sample_temp": Param(1.0, check_positive, "generative tasks: the temperature of the second, "
                                                         "sampled decode (view sample)"),
        "max_new_tokens": Param(32, check_positive_int, "generative tasks: the longest answer a teacher or the "
                                                        "merge may give, in tokens"),
        "rounds": Param(3, check_positive_int, "identify-and-level rounds"),
        "steps": Param(100, check_positive_int, "optimisation steps per round"),
        "keep": Param("best", check_choice("best", "last"), "which round's merge to keep: best (the least average "
                                                            "disagreement with the experts on the pools; "
                                                            "label-free) or last"),
        "lr": Param(1e-2, check_positive, "Adam learning rate"),
        "batch_size": Param(16, check_positive_int, "parity samples per task per step (and as many agreeing ones)"),
        "kl_weight": Param(0.0, check_number, "weight of T²·KL(expert ‖ merged) on parity samples"),
        "kl_temperature": Param(2.0, check_positive, "the temperature T of that KL"),
        "agree_weight": Param(1.0, check_number, "weight of KL(expert ‖ merged) on reliable samples that agree"),
        "split": Param(None, check_string, "which split of a registry task is the unlabeled pool (default train; "
                                           "generative tasks: pool)"),
        "eval_split": Param("test", check_string, "labelled split measured each round, never trained on "
                                                  "(none: skip)"),
        "precision": COMMON["precision"],
        "normalize": Param(True, check_bool, "start ties: dis-mean (true) or dis-sum (false)"),
    }
    model_parameters = {**MODEL,
                        "teacher": Param(None, check_string, "the model that labels this task's pool (default: "
                                                             "the expert itself), e.g. its MergeLock-protected copy"),
                        "weight": Param(0.3, check_number, "start task_arithmetic / ties: the expert's weight"),
                        "density": Param(1.0, check_density, "start ties: the expert's density")}

    def settings(self, options: dict[str, Any] | None = None, *, seed: int = 0, autocast: bool = False,
                 pad_id: int = 0) -> ParitySettings:  # type: ignore[override]
        """The distillation's settings: ``options`` over the parameter table's defaults."""
        options = options or {}
        keys = set(ParitySettings.__dataclass_fields__) - {"train", "seed", "autocast", "pad_id"}
        values = {k: self.option(options, k) for k in self.parameters if k in keys}
        train = tuple(x.strip() for x in str(self.option(options, "train")).split(","))
        return ParitySettings(**values, train=train, seed=seed, autocast=autocast, pad_id=pad_id)

    def _start(self, inputs, parts, s: ParitySettings):
        """The start merge as a trainable ``Merger``: its directions, coefficients and mask."""
        options = inputs.options
        start = inputs.start(self.option(options, "start"), parts.task_vectors)
        mask = start.mask or (self.option(options, "mask") if "mask" in s.train else None)
        merger = Merger(parts.base, start.directions, coefficients=self.option(options, "coefficients"), mask=mask,
                        temperature=s.temperature, device=inputs.device)
        merger.set_coefficients(start.coefficient_matrix(merger.names))
        if start.mask_logits:
            merger.set_logits(start.mask_logits)
        start.directions = []  # the merger holds its own copy
        return start, mask, merger

    def learn(self, inputs):
        """Rebuild the start merge, label each task's pool with its teacher, and level
        the merge round by round."""
        options = inputs.options
        s = self.settings(options, seed=inputs.seed, autocast=inputs.autocast, pad_id=inputs.pad_id)
        pools = inputs.prompts(self.option(options, "split") or "pool")
        if pools is not None:
            if options.get("tau") is None:
                s = dataclasses.replace(s, tau=GENERATIVE_TAU)
            return self._learn_generative(inputs, s, pools)
        split = self.option(options, "split") or "train"
        data = inputs.task_data("entropy", split)
        evals = inputs.eval_data(self.option(options, "eval_split"))
        parts = inputs.parts()
        start, mask, merger = self._start(inputs, parts, s)
        teachers, sources = inputs.teachers(parts)
        result = distill(merger, parts.forward, teachers, data, s, start_bits=start.mask_bits,
                         start_offsets=start.offsets, eval_data=evals, report=inputs.report, log=inputs.log)
        # Label-free unless the start read labels (the eval split is only measured, never used).
        used = {"objective": "parity", "supervised": bool(start.record.get("supervised")), "split": split,
                "start": start.record,
                "teachers": sources, "tau": s.tau, "view": s.view, "train": list(s.train),
                "coefficient_scope": merger.mode, "rounds": s.rounds, "steps": result.steps_done,
                "seconds": round(result.seconds, 3), "tasks": [d.name for d in data],
                "eval_split": self.option(options, "eval_split"), "keep": s.keep,
                "kept_round": next(r["round"] for r in result.rounds if r["kept"]), "table": result.rounds,
                "coefficient_tensors": merger.names}
        if mask:
            used["mask"] = mask
        if result.offsets:
            used["offset_tensors"] = sorted(result.offsets)
        return result, used

    def _learn_generative(self, inputs, s: ParitySettings, pools):
        """The same for generative tasks (causal LMs): each expert answers its task's pool
        of prompts; ``merge.learned.generative_parity.distill_generative``."""
        options = inputs.options
        split = self.option(options, "split") or "pool"
        eval_split = self.option(options, "eval_split")
        evals = None
        if eval_split and eval_split != "none":
            try:
                evals = inputs.prompts(eval_split)
            except ZooError:  # no such split: nothing to measure
                evals = None
        codec = inputs.codec()
        names = inputs.task_names()
        tasks = gen_tasks(names, pools, codec, evals)
        parts = inputs.parts()
        start, mask, merger = self._start(inputs, parts, s)
        teachers, sources = inputs.teachers(parts)
        cache = inputs.decode_cache(sources, [len(t) for t in tasks], s.max_new_tokens, s.view != "none")
        result, annotations = distill_generative(merger, parts.forward, teachers, tasks, codec, s,
                                                 start_bits=start.mask_bits, start_offsets=start.offsets,
                                                 report=inputs.report, log=inputs.log, cache=cache)
        used = {"objective": "parity", "generative": True, "supervised": bool(start.record.get("supervised")),
                "split": split, "start": start.record, "teachers": sources,
                "teacher_answers": [a.digest() for a in annotations],
                "teacher_answer_artifacts": list(cache.keys) if cache is not None else [None] * len(tasks),
                "teacher_answers_reused": [a.reused for a in annotations],
                "teacher_seconds": [round(a.seconds, 3) for a in annotations], "tau": s.tau,
                "view": "none" if s.view == "none" else "sample", "sample_temp": s.sample_temp,
                "max_new_tokens": s.max_new_tokens, "train": list(s.train), "coefficient_scope": merger.mode,
                "rounds": s.rounds, "steps": result.steps_done, "seconds": round(result.seconds, 3),
                "tasks": [t.name for t in tasks], "eval_split": eval_split if evals is not None else None,
                "keep": s.keep, "kept_round": next(r["round"] for r in result.rounds if r["kept"]),
                "table": result.rounds, "coefficient_tensors": merger.names}
        if mask:
            used["mask"] = mask
        if result.offsets:
            used["offset_tensors"] = sorted(result.offsets)
        return result, used

    def pin(self, recipe, used):
        """The start and the teachers at the versions that were used."""
        if used["start"].get("model"):
            recipe["parameters"]["start"] = used["start"]["model"]
        for spec, teacher in zip(recipe["models"], used["teachers"]):
            if (spec.get("parameters") or {}).get("teacher"):
                spec["parameters"] = {**spec["parameters"], "teacher": teacher}

    def lineage_parents(self, learned, registry, parents):
        """The start and the registered teachers that are not already parents."""
        if not learned:
            return []
        have = {ref for _, ref in parents}
        out = [("start", learned["start"]["model"])] if learned["start"].get("model") else []
        out += [("teacher", t) for t in dict.fromkeys(learned["teachers"]) if t not in have and registry.has(t)]
        return out

    def metrics(self, learned):
        """The kept round, per task: the parity set's size and the disagreement with the
        expert on the pool, and accuracy on the measured split."""
        if not learned or not learned.get("table"):
            return []
        out = []
        for row in (r for r in learned["table"] if r["kept"]):
            pool = {"task": row["task"], "split": learned["split"], "dataset": f"zoo-task:{row['task']}"}
            out += [Measurement("parity_set", row["parity"], **pool),
                    Measurement("disagreement", row["disagreement"], **pool)]
            if row.get("exact_match") is not None:  # generative tasks
                out.append(Measurement("exact_match", row["exact_match"], row["task"], learned["eval_split"],
                                       f"zoo-task:{row['task']}"))
            if row.get("accuracy") is not None:
                out.append(Measurement("accuracy", row["accuracy"], row["task"], learned["eval_split"],
                                       f"zoo-task:{row['task']}"))
        return out

    def card_lines(self, learned):
        if not learned:
            return []
        start = learned["start"].get("model") or learned["start"]["method"]
        if learned.get("generative"):
            second = " and the same answer from a second, sampled decode" if learned["view"] == "sample" else ""
            return [f"Levelled by parity distillation from `{start}` ({learned['rounds']} round(s), "
                    f"{learned['steps']} steps, training {', '.join(learned['train'])}; the merge after round "
                    f"{learned['kept_round']} kept): "
                    + ("supervised, since its start read labels; " if learned.get("supervised") else "label-free, ")
                    + f"each expert answered its own task's `{learned['split']}` prompts greedily and the merge "
                    f"trained on the expert's answers only where the expert was reliable (mean token confidence "
                    f"≥ {learned['tau']}{second}) and the merge answered differently.", ""]
        return [f"Levelled by parity distillation from `{start}` ({learned['rounds']} round(s), "
                f"{learned['steps']} steps, training {', '.join(learned['train'])}; the merge after round "
                f"{learned['kept_round']} kept): "
                + ("supervised, since its start read labels; " if learned.get("supervised") else "label-free, ")
                + "each expert "
                f"labelled its own task's unlabeled `{learned['split']}` inputs and the merge trained only where "
                f"the expert was reliable (confidence ≥ {learned['tau']}, the same label on a second view) and "
                "the merge disagreed.", ""]

    def start_directions(self, source):
        """The directions of the merge this one started from, and its mask."""
        learned = source.learned
        inner = learned.get("start") or {}
        start = source.resolve(inner.get("model") or inner.get("method", ""), {**source.recipe, "learned": None}) \
            if inner else None
        if start is None:
            raise ZooError(f"start {source.label}: its lineage does not say where it started")
        return start.directions, learned.get("mask")
