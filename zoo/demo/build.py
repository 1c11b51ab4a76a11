"""The demo zoo: a real, offline family of experts built from scikit-learn's digits.

A small ViT base is pre-trained on digit identity with half of the training images,
then fine-tuned into one expert per task (each with its own transform, label set and
new linear head). Everything is seeded; the built checkpoints are cached, so a second
run only registers and prints. The design and its measured interference are in
a feasibility study of merging interference on this zoo (configuration F).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from zoo.registry import Registry

DEMO_VERSION = 3  # bump when the build changes, so old caches are not reused
# The build runs on this many torch threads, with deterministic algorithms: float sums
# split across threads round differently, so the zoo's bytes (and every number measured
# on it) would otherwise depend on the machine's core count.
BUILD_THREADS = 1
# The libraries whose versions decide the built bytes; they and the thread setting key the cache.
BUILD_LIBRARIES = ("torch", "transformers", "numpy", "scikit-learn", "safetensors")

# name -> (transform, labels)
TASKS: dict[str, tuple[str, list[str]]] = {
    "digit": ("none", [str(d) for d in range(10)]),
    "parity": ("none", ["even", "odd"]),
    "ge5": ("none", ["<5", ">=5"]),
    "prime": ("none", ["not prime", "prime"]),
    "mod3": ("none", ["0", "1", "2"]),
    "rot90": ("rot90", [str(d) for d in range(10)]),
    "invert": ("invert", [str(d) for d in range(10)]),
    "hflip": ("hflip", [str(d) for d in range(10)]),
}
PRIMES = {2, 3, 5, 7}


def task_labels(task: str, digit: "Any") -> "Any":
    """Map digit labels (a tensor) to the task's labels."""
    if task == "parity":
        return digit % 2
    if task == "ge5":
        return (digit >= 5).long()
    if task == "prime":
        return sum((digit == p).long() for p in PRIMES)
    if task == "mod3":
        return digit % 3
    return digit


@dataclass(frozen=True)
class DemoConfig:
    """Everything that decides the demo zoo's bytes; its hash keys the cache."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 256
    base_epochs: int = 30
    base_lr: float = 1e-3
    expert_epochs: int = 5
    expert_lr: float = 2e-4
    batch_size: int = 32
    seed: int = 0
    tasks: tuple[str, ...] = tuple(TASKS)
    prefix: str = "demo"

    def key(self) -> str:
        """The cache key: the config, the build's thread setting and the library versions."""
        blob = json.dumps({"v": DEMO_VERSION, **asdict(self), "environment": build_environment()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_environment() -> dict[str, Any]:
    """What besides the config decides the built bytes: the thread setting and the versions."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    return {"threads": BUILD_THREADS, "deterministic": True, "versions": {n: ver(n) for n in BUILD_LIBRARIES}}


@contextmanager
def deterministic(threads: int = BUILD_THREADS) -> Iterator[None]:
    """Fixed torch threads and deterministic algorithms inside, the caller's settings after."""
    import torch

    threads_before, det_before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(det_before)
        torch.set_num_threads(threads_before)


FULL = DemoConfig()
# For CI and smoke tests: the same pipeline on a model small enough to build in seconds.
QUICK = DemoConfig(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, base_epochs=10,
                   expert_epochs=3, expert_lr=2e-3, prefix="demo-quick")


@dataclass
class DemoResult:
    config: DemoConfig
    base: str
    experts: dict[str, str]
    accuracy: dict[str, float]
    built: bool
    seconds: float
    cache: Path
    registry: Path
    store: Path
    rows: list[dict[str, Any]] = field(default_factory=list)


def cache_root() -> Path:
    return Path(os.environ.get("ZOO_CACHE") or Path.home() / ".cache" / "zoo") / "demo"


def _digits_splits(seed: int):
    """Stratified train / validation / test split of about 60 / 10 / 30."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None, :, :]  # N,1,8,8 in [0,1]
    y = d.target.astype(np.int64)
    idx = np.arange(len(y))
    rest, test = train_test_split(idx, test_size=0.30, stratify=y, random_state=seed)
    train, val = train_test_split(rest, test_size=0.15, stratify=y[rest], random_state=seed)
    return x, y, {"train": np.sort(train), "val": np.sort(val), "test": np.sort(test)}


def _transform(x, kind: str):
    import numpy as np

    if kind == "rot90":
        x = np.rot90(x, k=1, axes=(2, 3))
    elif kind == "invert":
        x = 1.0 - x
    elif kind == "hflip":
        x = x[:, :, :, ::-1]
    return (np.ascontiguousarray(x) - 0.5) / 0.5  # normalise to [-1, 1]


def _vit_config(cfg: DemoConfig, labels: list[str]):
    from transformers import ViTConfig

    return ViTConfig(
        image_size=8, patch_size=2, num_channels=1, hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        intermediate_size=cfg.intermediate_size, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
        id2label={i: l for i, l in enumerate(labels)}, label2id={l: i for i, l in enumerate(labels)},
    )


def _train(model, x, y, epochs: int, lr: float, batch_size: int, seed: int) -> None:
    """AdamW with a one-cycle schedule, seeded shuffling."""
    import torch

    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch_size):
            b = perm[i:i + batch_size]
            loss = torch.nn.functional.cross_entropy(model(pixel_values=x[b]).logits, y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()


def build(cfg: DemoConfig, out: Path, log: Callable[[str], None] = print) -> Path:
    """Build the demo zoo's checkpoints and task files into ``out`` (atomically), on
    ``BUILD_THREADS`` torch threads with deterministic algorithms."""
    with deterministic():
        return _build(cfg, out, log)


def _build(cfg: DemoConfig, out: Path, log: Callable[[str], None]) -> Path:
    import torch
    import transformers
    from transformers import ViTForImageClassification

    from zoo.checkpoints.taskdata import save_task_data

    transformers.utils.logging.disable_progress_bar()

    torch.manual_seed(cfg.seed)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "tasks").mkdir(parents=True)
    try:
        x, y, split = _digits_splits(cfg.seed)
        data: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        for task in cfg.tasks:
            kind, labels = TASKS[task]
            xt = torch.from_numpy(_transform(x, kind).astype("float32"))
            yt = task_labels(task, torch.from_numpy(y))
            data[task] = {s: (xt[i], yt[i]) for s, i in split.items()}
            save_task_data(tmp / "tasks" / f"{task}.safetensors", data[task], labels)

        t0 = time.perf_counter()
        digits = [str(d) for d in range(10)]
        base = ViTForImageClassification(_vit_config(cfg, digits))
        train = torch.from_numpy(split["train"][: len(split["train"]) // 2])
        xtr = torch.from_numpy(_transform(x, "none").astype("float32"))[train]
        ytr = torch.from_numpy(y)[train]
        half = len(ytr)
        _train(base, xtr, ytr, cfg.base_epochs, cfg.base_lr, cfg.batch_size, cfg.seed)
        base.save_pretrained(tmp / "base")
        log(f"  pre-trained base on digit identity ({half} images, {cfg.base_epochs} epochs) "
            f"in {time.perf_counter() - t0:.1f} s")

        body = {k: v for k, v in base.state_dict().items() if not k.startswith("classifier.")}
        for i, task in enumerate(cfg.tasks):
            t0 = time.perf_counter()
            torch.manual_seed(cfg.seed + 1 + i)
            expert = ViTForImageClassification(_vit_config(cfg, TASKS[task][1]))
            # A fresh head with torch's default Linear init, as in the feasibility study.
            expert.classifier.reset_parameters()
            missing, _ = expert.load_state_dict(body, strict=False)
            assert all(k.startswith("classifier.") for k in missing), missing
            xt, yt = data[task]["train"]
            _train(expert, xt, yt, cfg.expert_epochs, cfg.expert_lr, cfg.batch_size, cfg.seed + 1 + i)
            expert.save_pretrained(tmp / "experts" / task)
            log(f"  fine-tuned expert {task} in {time.perf_counter() - t0:.1f} s")
        (tmp / "demo.json").write_text(json.dumps({"key": cfg.key(), "config": asdict(cfg),
                                                   "environment": build_environment()}, indent=2))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def run_demo(registry: Registry, cfg: DemoConfig = FULL, log: Callable[[str], None] = print,
             cache: Path | None = None) -> DemoResult:
    """Build (or reuse) the demo zoo, register it, and measure every expert."""
    from zoo.evaluate import evaluate

    t0 = time.perf_counter()
    key = cfg.key()
    folder = (cache or cache_root()) / key
    built = False
    if not (folder / "demo.json").is_file():
        log(f"building the demo zoo ({len(cfg.tasks)} tasks) into {folder} on {BUILD_THREADS} torch thread(s), "
            "deterministic algorithms")
        build(cfg, folder, log)
        built = True
    else:
        log(f"reusing the cached demo zoo in {folder}")

    base_name = f"{cfg.prefix}-base"
    existing = [m for m in registry.list(tag="demo") if m["name"] == base_name]
    current = existing and registry.show(base_name)["metadata"].get("demo_key") == key
    meta = {"demo_key": key, "demo_config": asdict(cfg)}
    experts: dict[str, str] = {}
    if current:
        log(f"the demo zoo is already registered in {registry.path}")
        base_ref = registry.show(base_name)["ref"]
        for task in cfg.tasks:
            experts[task] = registry.show(f"{cfg.prefix}-{task}")["ref"]
    else:
        for task in cfg.tasks:
            registry.add_task(task, TASKS[task][1], folder / "tasks" / f"{task}.safetensors",
                              data_format="zoo-task-v1", description=f"sklearn digits, transform {TASKS[task][0]}",
                              splits=_split_sizes(folder / "tasks" / f"{task}.safetensors"), replace=True)
        renew = bool(existing)
        base_ref = registry.add(folder / "base", base_name, "base", tags=["demo"], metadata=meta,
                                new_version=renew)["ref"]
        for task in cfg.tasks:
            experts[task] = registry.add(folder / "experts" / task, f"{cfg.prefix}-{task}", "expert",
                                         base=base_ref, tasks=[task], tags=["demo"], metadata=meta,
                                         new_version=renew or registry.has(f"{cfg.prefix}-{task}"))["ref"]
        log(f"registered {base_ref} and {len(experts)} experts in {registry.path}")

    acc: dict[str, float] = {}
    rows = []
    for task, ref in experts.items():
        recorded = [m for m in registry.metrics(ref, task) if m["metric"] == "accuracy" and m["split"] == "test"]
        if recorded:
            acc[task] = recorded[-1]["value"]
        else:
            acc[task] = evaluate(registry, ref, [task])[0]["value"]
        rows.append({"task": task, "model": ref, "accuracy": acc[task]})
    return DemoResult(cfg, base_ref, experts, acc, built, time.perf_counter() - t0, folder,
                      registry.path, registry.store.root, rows)


def _split_sizes(path: Path) -> dict[str, int]:
    from zoo.checkpoints.taskdata import task_info

    return task_info(path)["splits"]


__all__ = ["BUILD_THREADS", "DemoConfig", "DemoResult", "FULL", "QUICK", "TASKS", "build", "build_environment",
           "deterministic", "run_demo"]
