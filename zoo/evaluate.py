"""``zoo eval``: measure a registered model on a task's split and record the metric."""

from __future__ import annotations

from typing import Any

from zoo.checkpoints.heads import read_task_heads
from zoo.errors import ZooError
from zoo.registry import Registry
from zoo.checkpoints.taskdata import load_split, task_info


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
             record: bool = True) -> list[dict[str, Any]]:
    """Accuracy of a model on each task (default: the model's own tasks)."""
    info = registry.show(ref)
    tasks = tasks or info["tasks"]
    if not tasks:
        raise ZooError(f"{info['ref']} has no tasks; name one with --task")
    results = []
    for task in tasks:
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
