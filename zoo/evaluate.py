"""``zoo eval``: measure a registered model on a task's split and record the metric.

A classification task (a zoo task file of inputs and labels) is measured by accuracy.
A generative task (JSONL prompts with reference answers, ``zoo.checkpoints.prompts``)
is measured on a causal LM by the exact match of its greedy answers and by the
log-likelihood of the reference answers (``zoo.textgen``); ``add_prompt_task``
registers one, checked line by line and, given a model, against its context.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo.checkpoints.heads import read_task_heads
from zoo.checkpoints.prompts import FORMAT as PROMPTS_FORMAT, prompt_splits, read_prompts
from zoo.errors import AlreadyExists, PromptDataError, ZooError
from zoo.registry import Registry
from zoo.checkpoints.taskdata import load_split, task_info

# What a generative evaluation records: exact match (0-1), the reference answers'
# log-likelihood per answer token (their end token included; nats), and per answer.
EXACT_MATCH = "exact_match"
LOGLIK_TOKEN = "answer_loglik_token"
LOGLIK_ANSWER = "answer_loglik"


def load_model(registry: Registry, ref: str, task: str | None = None):
    """Load a registered model with ``transformers``, by the class its config names.

    For a merged model that keeps its experts' task heads, ``task`` picks the head:
    the merged body with the head of the expert made for that task.
    """
    import transformers

    transformers.utils.logging.disable_progress_bar()
    path = registry.model_dir(ref)
    try:
        config = transformers.AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ZooError(f"{ref}: transformers cannot read its config.json ({' '.join(str(e).split())[:200]})") from None
    archs = getattr(config, "architectures", None) or []
    cls = getattr(transformers, archs[0], None) if archs else None
    if cls is None:
        raise ZooError(f"{ref}: config.json names no transformers architecture that zoo can run")
    head = next((e for e in read_task_heads(path).values() if task in e["tasks"]), None) if task else None
    kwargs = {}
    if head is not None:
        labels = {int(k): v for k, v in (head.get("id2label") or _default_labels(head)).items()}
        config.id2label, config.label2id = labels, {v: k for k, v in labels.items()}
        kwargs = {"config": config, "ignore_mismatched_sizes": True}
    try:
        verbosity = transformers.utils.logging.get_verbosity()
        transformers.utils.logging.set_verbosity_error()
        try:
            model = cls.from_pretrained(path, **kwargs)
        finally:
            transformers.utils.logging.set_verbosity(verbosity)
    except (OSError, ValueError, RuntimeError) as e:
        raise ZooError(f"{ref}: transformers cannot load it ({' '.join(str(e).split())[:200]})") from None
    if head is not None:
        ckpt = head["checkpoint"]
        state = {n: ckpt.read_tensor(head["prefix"] + n) for n in head["tensors"]}
        missing = set(state) - set(model.state_dict())
        if missing:
            raise ZooError(f"{ref}: task head tensors {sorted(missing)} do not fit {archs[0]}")
        model.load_state_dict(state, strict=False)
    model.eval()
    return model


def _default_labels(head: dict[str, Any]) -> dict[str, str]:
    """transformers leaves id2label out of config.json for two labels (its default), and
    an adapter has no config: count the labels from the head's output bias instead."""
    ckpt, biases = head["checkpoint"], [n for n in head["tensors"] if n.endswith(".bias")]
    n = ckpt.tensors[head["prefix"] + sorted(biases)[-1]].shape[0] if biases else 2
    return {str(i): f"LABEL_{i}" for i in range(n)}


def accuracy(model, x, y, input_name: str = "pixel_values", batch_size: int = 256) -> float:
    import torch

    correct = 0
    with torch.inference_mode():
        for i in range(0, len(y), batch_size):
            logits = model(**{input_name: x[i:i + batch_size]}).logits
            correct += int((logits.argmax(-1) == y[i:i + batch_size]).sum())
    return correct / max(len(y), 1)


def evaluate(registry: Registry, ref: str, tasks: list[str] | None = None, split: str = "test",
             record: bool = True, max_new_tokens: int | None = None) -> list[dict[str, Any]]:
    """Accuracy of a model on each task (default: the model's own tasks); on a
    generative task, exact match and the reference answers' log-likelihood
    (``evaluate_generative``; ``max_new_tokens`` bounds its greedy answers)."""
    info = registry.show(ref)
    tasks = tasks or info["tasks"]
    if not tasks:
        raise ZooError(f"{info['ref']} has no tasks; name one with --task")
    results = []
    for task in tasks:
        if is_generative(registry.task(task)):
            results.append(evaluate_generative(registry, info["ref"], task, split, record=record,
                                               max_new_tokens=max_new_tokens).as_dict())
            continue
        model = load_model(registry, info["ref"], task)
        path = registry.task_data(task)
        meta = task_info(path)
        n_out = getattr(model.config, "num_labels", None)
        if n_out is not None and n_out != len(meta["labels"]):
            raise ZooError(f"{info['ref']} predicts {n_out} labels but task {task!r} has {len(meta['labels'])}")
        x, y = load_split(path, split)
        acc = accuracy(model, x, y, meta["input"])
        if record:
            registry.record_metric(info["ref"], task, "accuracy", acc, split=split, dataset=f"zoo-task:{task}")
        results.append({"model": info["ref"], "task": task, "split": split, "metric": "accuracy", "value": acc,
                        "n": int(len(y))})
    return results


def is_generative(task: dict[str, Any]) -> bool:
    """Whether a registered task (``Registry.task``) is a generative one: JSONL prompts."""
    return task.get("data_format") == PROMPTS_FORMAT


def task_kind(task: dict[str, Any]) -> str:
    """``generative``, ``classification`` (a task file with labels), or ``-`` (no data yet)."""
    if is_generative(task):
        return "generative"
    return "classification" if task.get("data_sha256") else "-"


@dataclass
class GenerativeScore:
    """A causal LM on one split of a generative task: the share of greedy answers equal
    to the reference (``zoo.textgen.same_answer``), and the reference answers' mean
    log-likelihood per token (over all answer tokens, end tokens included) and per answer."""

    model: str
    task: str
    split: str
    exact_match: float
    loglik_token: float
    loglik_answer: float
    n: int
    answer_tokens: int
    max_new_tokens: int

    def as_dict(self) -> dict[str, Any]:
        # "metric"/"value" as a classification result has them, so tables and scripts read both
        return {"model": self.model, "task": self.task, "split": self.split, "metric": EXACT_MATCH,
                "value": self.exact_match, LOGLIK_TOKEN: self.loglik_token, LOGLIK_ANSWER: self.loglik_answer,
                "n": self.n, "answer_tokens": self.answer_tokens, "max_new_tokens": self.max_new_tokens}


def model_context(folder: Path) -> int | None:
    """The model's maximum positions, from its config.json (None when it names none)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None


def text_codec(registry: Registry, ref: str):
    """The tokenizer a generative task is run with: the model's own, or (a merge or an
    expert saved without one) its base's."""
    from zoo.textgen import TextCodec

    folder = registry.model_dir(ref)
    context = model_context(folder)
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    if not any((folder / f).is_file() for f in tokenizer_files):
        base = registry.show(ref).get("base")
        if base:
            folder = registry.model_dir(base)
    return TextCodec.from_folder(folder, context)


def _causal_lm(model, ref: str, task: str):
    # generate() over a decoder-only model: an encoder-decoder needs decoder inputs textgen does not build
    can_generate = getattr(model, "can_generate", None)
    if not (callable(can_generate) and can_generate()) or getattr(model.config, "is_encoder_decoder", False):
        raise ZooError(f"{ref} is a {type(model).__name__}, not a causal LM: generative task {task!r} needs one "
                       "that generates text")
    return model


def evaluate_generative(registry: Registry, ref: str, task: str, split: str = "test", *, record: bool = True,
                        max_new_tokens: int | None = None, batch_size: int = 64) -> GenerativeScore:
    """A causal LM on one split of a generative task: greedy answers (``zoo.textgen.generate``,
    at most ``max_new_tokens``, by default the longest reference answer's tokens with its
    end token, so an answer that runs on is cut after the point where it went wrong) for
    exact match, and the reference answers' log-likelihood under teacher forcing. Every
    prompt needs a reference answer. With ``record``, the three metrics are recorded."""
    import torch

    from zoo.textgen import answer_loglik, generate, same_answer, teacher_forced

    if max_new_tokens is not None and max_new_tokens < 1:
        raise ZooError("--max-new-tokens must be at least 1")
    codec = text_codec(registry, ref)
    rows = read_prompts(registry.task_data(task), split=split, lengths=codec.lengths, context=codec.context)
    unanswered = sum(p.answer is None for p in rows)
    if unanswered:
        raise PromptDataError(f"task {task!r}, split {split!r}: {unanswered} of {len(rows)} prompts have no "
                              "reference answer, so exact match cannot be measured; evaluate on a split with answers")
    model = _causal_lm(load_model(registry, ref), ref, task)
    prompts = [codec.prompt_ids(p) for p in rows]
    answers = [codec.answer_ids(p.answer or "") for p in rows]
    budget = max_new_tokens or max(len(a) for a in answers)

    def logits(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return model(**batch).logits

    with torch.inference_mode():
        gens = generate(logits, prompts, codec.eos_id, budget, batch_size=batch_size, context=codec.context)
        total, count = [], []
        for i in range(0, len(rows), batch_size):
            batch = teacher_forced(prompts[i:i + batch_size], answers[i:i + batch_size], codec.pad_id)
            t, c = answer_loglik(logits, batch)
            total.append(t)
            count.append(c)
    total_t, count_t = torch.cat(total), torch.cat(count)
    matches = sum(same_answer(codec.decode(g.tokens), p.answer or "") for g, p in zip(gens, rows))
    score = GenerativeScore(ref, task, split, matches / len(rows), float(total_t.sum() / count_t.sum()),
                            float(total_t.mean()), len(rows), int(count_t.sum()), budget)
    if record:
        dataset = f"zoo-task:{task}"
        for metric, value in ((EXACT_MATCH, score.exact_match), (LOGLIK_TOKEN, score.loglik_token),
                              (LOGLIK_ANSWER, score.loglik_answer)):
            registry.record_metric(ref, task, metric, value, split=split, dataset=dataset)
    return score


def add_prompt_task(registry: Registry, name: str, path: Path, *, description: str | None = None,
                    model: str | None = None, replace: bool = False) -> dict[str, Any]:
    """Register a generative task from a JSONL prompt file (``zoo.checkpoints.prompts``).

    Every line is checked before anything is stored; with ``model`` (a registry name),
    every prompt and answer must also fit that model's context as its tokenizer counts
    them. Returns the registered task, with its ``kind``."""
    path = Path(path)
    if path.is_dir():
        raise PromptDataError(f"{path} is a folder; a generative task is one JSONL file of prompts")
    splits = prompt_splits(path)
    meta: dict[str, Any] = {}
    if model is not None:
        ref = registry.show(model)["ref"]
        codec = text_codec(registry, ref)
        if codec.context is None:
            raise ZooError(f"{ref}'s config.json names no maximum length, so the answers cannot be checked "
                           "against its context")
        read_prompts(path, lengths=codec.lengths, context=codec.context)
        meta = {"checked_against": ref, "context": codec.context}
    if not replace:  # refused before the store ingests the file, so a refusal leaves no blob behind
        old = next((t for t in registry.tasks() if t["name"] == name), None)
        if old and old["data_sha256"] and old["data_sha256"] != hashlib.sha256(path.read_bytes()).hexdigest():
            raise AlreadyExists(f"task {name!r} already exists with other data; pass --replace to replace it")
    task = registry.add_task(name, data=path, data_format=PROMPTS_FORMAT, splits=splits, description=description,
                             metadata=meta or None, replace=replace)
    return {**task, "kind": task_kind(task)}

