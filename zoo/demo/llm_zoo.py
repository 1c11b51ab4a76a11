"""The LLM demo zoo: a tiny Llama base and one causal-LM expert per synthetic text task.

A character-level Llama (random init, seeded) is pre-trained from scratch on a mix of
text tasks with checkable answers (``zoo.demo.llm_tasks``), then fine-tuned into one
expert per task. Every model is a standard Hugging Face folder (config.json,
model.safetensors, a tokenizer ``transformers`` loads), and each task's prompts are
JSONL splits (pool/val/test; every split keeps its reference answers, which a label-free
method must ignore). The build is seeded, runs on fixed torch threads with
deterministic algorithms, and is cached under a key of its config, the library
versions and the thread setting, as the classifier demo is.

Its feasibility (experts against task arithmetic and TIES, build time) is measured by
``bench/llm_demo_feasibility.py``; ``zoo demo --llm`` (``zoo.demo.llm_tour``) registers,
merges and measures it.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zoo.checkpoints.prompts import Prompt, write_prompts
from zoo.demo.build import BUILD_LIBRARIES, deterministic
from zoo.demo.llm_tasks import ALPHABET, TASKS, held_out, sample

if TYPE_CHECKING:
    import torch

LLM_DEMO_VERSION = 1  # bump when the build changes, so old caches are not reused
# Fixed, so the bytes do not depend on the machine's core count (see zoo.demo.build).
LLM_BUILD_THREADS = 1
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
PAD, BOS, EOS = 0, 1, 2
SPLITS = ("pool", "val", "test")


@dataclass(frozen=True)
class LlmDemoConfig:
    """Everything that decides the LLM demo zoo's bytes; its hash keys the cache."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 256
    context: int = 32
    base_steps: int = 600
    base_lr: float = 3e-3
    expert_steps: int = 200
    expert_lr: float = 1e-3
    # share of each expert's training prompts drawn from the base's mix (replay) instead of its task
    expert_replay: float = 0.5
    batch_size: int = 64
    seed: int = 0
    tasks: tuple[str, ...] = ("sort", "count", "upper", "rev", "caesar")
    # Relative share of the base's pre-training batches per task (None: equal). Less of
    # the first three leaves the base weak on them, so every expert has something to add.
    base_mix: tuple[float, ...] | None = (0.3, 0.3, 0.3, 1.0, 1.0)
    pool_size: int = 256
    val_size: int = 128
    test_size: int = 256

    def key(self) -> str:
        """The cache key: the config, the build's thread setting and the library versions."""
        blob = json.dumps({"v": LLM_DEMO_VERSION, **asdict(self), "environment": llm_build_environment()},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def split_sizes(self) -> dict[str, int]:
        return {"pool": self.pool_size, "val": self.val_size, "test": self.test_size}


LLM_FULL = LlmDemoConfig()
# For tests: the same pipeline, small enough to build in seconds.
LLM_QUICK = LlmDemoConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, base_steps=40,
                          expert_steps=15, batch_size=32, tasks=("add", "rev", "upper"),
                          base_mix=None, pool_size=16, val_size=16, test_size=16)


def llm_build_environment() -> dict[str, Any]:
    """What besides the config decides the built bytes: the thread setting and the versions."""
    from importlib.metadata import PackageNotFoundError, version

    def ver(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None
    names = tuple(n for n in BUILD_LIBRARIES if n != "scikit-learn") + ("tokenizers",)
    return {"threads": LLM_BUILD_THREADS, "deterministic": True, "versions": {n: ver(n) for n in names}}


def vocabulary() -> dict[str, int]:
    """Token ids: the special tokens, then one per character of the tasks' alphabet."""
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    for c in ALPHABET:
        vocab[c] = len(vocab)
    return vocab


def encode(text: str) -> list[int]:
    """Character ids without specials; the same ids the saved tokenizer gives (a test checks)."""
    vocab = vocabulary()
    return [vocab[c] for c in text]


def save_tokenizer(folder: Path, context: int) -> None:
    """A character-level tokenizer ``AutoTokenizer`` loads: it adds ``<s>`` in front,
    decodes without spaces, and pads on the left for batched generation."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocabulary(), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=context, padding_side="left")
    fast.save_pretrained(folder)


def llama_config(cfg: LlmDemoConfig):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(vocabulary()), hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_heads,
        max_position_embeddings=cfg.context, tie_word_embeddings=False,
        pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS,
    )


def _batch(rows: Sequence[Prompt], context: int) -> tuple["torch.Tensor", "torch.Tensor"]:
    """``<s> prompt answer </s>``, right-padded; labels only on the answer and ``</s>``.
    Right padding needs no attention mask: a causal model never looks ahead at the pads."""
    import torch

    seqs, labels = [], []
    for r in rows:
        p, a = [BOS] + encode(r.prompt), encode(r.answer or "") + [EOS]
        seqs.append(p + a)
        labels.append([-100] * len(p) + a)
    n = max(map(len, seqs))
    if n > context:
        raise ValueError(f"a training sequence of {n} tokens exceeds the context of {context}")
    ids = torch.tensor([s + [PAD] * (n - len(s)) for s in seqs])
    lab = torch.tensor([s + [-100] * (n - len(s)) for s in labels])
    return ids, lab


def _train(model, draw: Callable[[], list[Prompt]], steps: int, lr: float, context: int) -> list[float]:
    """AdamW with a one-cycle schedule on freshly drawn batches; returns the loss curve."""
    import torch

    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    losses = []
    for _ in range(steps):
        ids, lab = _batch(draw(), context)
        loss = model(input_ids=ids, labels=lab).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _drawer(tasks: Sequence[str], weights: Sequence[float], batch: int, rng: random.Random,
            excluded: set[str]) -> Callable[[], list[Prompt]]:
    """Random training prompts of the given task mix, never a held-out prompt."""
    def draw() -> list[Prompt]:
        out: list[Prompt] = []
        while len(out) < batch:
            p = sample(rng.choices(tasks, weights)[0], rng)
            if p.prompt not in excluded:
                out.append(p)
        return out
    return draw


def greedy(model, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 256) -> list[str]:
    """Greedy continuations, cut at ``</s>`` (``zoo.textgen.generate`` over the model)."""
    from zoo.textgen import generate

    chars = {i: c for c, i in vocabulary().items() if c not in SPECIALS}
    gens = generate(lambda batch: model(input_ids=batch["input_ids"]).logits, [[BOS] + encode(p) for p in prompts],
                    EOS, max_new_tokens, batch_size=batch_size)
    return ["".join(chars.get(t, "\ufffd") for t in g.tokens) for g in gens]


def exact_match(model, rows: Sequence[Prompt], max_new_tokens: int = 10) -> float:
    """The share (0-1) of prompts whose greedy answer equals the reference (``same_answer``)."""
    from zoo.textgen import same_answer

    answers = greedy(model, [r.prompt for r in rows], max_new_tokens)
    return sum(same_answer(a, r.answer or "") for a, r in zip(answers, rows)) / len(rows)


@dataclass
class LlmBuild:
    """What one build did: the folder, and its timings and losses (for the study)."""

    folder: Path
    seconds: dict[str, float] = field(default_factory=dict)
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    final_loss: dict[str, float] = field(default_factory=dict)


def build_llm_zoo(cfg: LlmDemoConfig, out: Path, log: Callable[[str], None] = print) -> LlmBuild:
    """Build the LLM demo zoo into ``out`` (atomically: a temp folder, then a rename), on
    ``LLM_BUILD_THREADS`` torch threads with deterministic algorithms. Layout:
    ``base/``, ``experts/<task>/`` (HF folders with a tokenizer), ``tasks/<task>/<split>.jsonl``
    and ``llm_demo.json``."""
    with deterministic(LLM_BUILD_THREADS):
        return _build(cfg, Path(out), log)


def _timed(rec: LlmBuild, name: str, t0: float, c0: float) -> None:
    rec.seconds[name] = round(time.perf_counter() - t0, 3)
    rec.cpu_seconds[name] = round(time.process_time() - c0, 3)


def _build(cfg: LlmDemoConfig, out: Path, log: Callable[[str], None]) -> LlmBuild:
    import torch
    import transformers
    from transformers import LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()
    unknown = [t for t in cfg.tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown LLM demo task(s) {unknown}; known: {', '.join(TASKS)}")
    if cfg.base_mix is not None and len(cfg.base_mix) != len(cfg.tasks):
        raise ValueError(f"base_mix has {len(cfg.base_mix)} shares for {len(cfg.tasks)} tasks")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    rec = LlmBuild(out)
    try:
        splits = {t: held_out(t, cfg.split_sizes(), cfg.seed) for t in cfg.tasks}
        excluded = {p.prompt for s in splits.values() for rows in s.values() for p in rows}
        for task, by_split in splits.items():
            (tmp / "tasks" / task).mkdir(parents=True)
            for split, rows in by_split.items():
                write_prompts(tmp / "tasks" / task / f"{split}.jsonl", rows)

        t0, c0 = time.perf_counter(), time.process_time()
        torch.manual_seed(cfg.seed)
        base = LlamaForCausalLM(llama_config(cfg))
        mix = cfg.base_mix or tuple(1.0 for _ in cfg.tasks)
        draw = _drawer(cfg.tasks, mix, cfg.batch_size, random.Random(f"base/{cfg.seed}"), excluded)
        rec.final_loss["base"] = _train(base, draw, cfg.base_steps, cfg.base_lr, cfg.context)[-1]
        _save(base, tmp / "base", cfg)
        _timed(rec, "base", t0, c0)
        log(f"  pre-trained the base on {len(cfg.tasks)} tasks ({cfg.base_steps} steps) in {rec.seconds['base']:.1f} s")

        base_state = {k: v.clone() for k, v in base.state_dict().items()}
        for i, task in enumerate(cfg.tasks):
            t0, c0 = time.perf_counter(), time.process_time()
            torch.manual_seed(cfg.seed + 1 + i)
            base.load_state_dict(base_state)
            share = [(1.0 - cfg.expert_replay) * (t == task) + cfg.expert_replay * m / sum(mix)
                     for t, m in zip(cfg.tasks, mix)]
            draw = _drawer(cfg.tasks, share, cfg.batch_size, random.Random(f"{task}/{cfg.seed}"), excluded)
            rec.final_loss[task] = _train(base, draw, cfg.expert_steps, cfg.expert_lr, cfg.context)[-1]
            _save(base, tmp / "experts" / task, cfg)
            _timed(rec, task, t0, c0)
            log(f"  fine-tuned expert {task} ({cfg.expert_steps} steps) in {rec.seconds[task]:.1f} s")
        (tmp / "llm_demo.json").write_text(json.dumps(
            {"key": cfg.key(), "config": asdict(cfg), "environment": llm_build_environment()}, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return rec


def _save(model, folder: Path, cfg: LlmDemoConfig) -> None:
    model.save_pretrained(folder)
    save_tokenizer(folder, cfg.context)


def llm_cache_root() -> Path:
    return Path(os.environ.get("ZOO_CACHE") or Path.home() / ".cache" / "zoo") / "llm-demo"


def llm_zoo(cfg: LlmDemoConfig = LLM_FULL, cache: Path | None = None,
            log: Callable[[str], None] = print) -> tuple[Path, LlmBuild | None]:
    """The cached zoo's folder, building it first if needed; the build record if it was built."""
    folder = (cache or llm_cache_root()) / cfg.key()
    if (folder / "llm_demo.json").is_file():
        log(f"reusing the cached LLM demo zoo in {folder}")
        return folder, None
    log(f"building the LLM demo zoo ({len(cfg.tasks)} tasks) into {folder} on {LLM_BUILD_THREADS} torch "
        "thread(s), deterministic algorithms")
    return folder, build_llm_zoo(cfg, folder, log)


__all__ = ["LLM_BUILD_THREADS", "LLM_FULL", "LLM_QUICK", "LlmBuild", "LlmDemoConfig", "build_llm_zoo", "encode",
           "exact_match", "greedy", "llama_config", "llm_build_environment", "llm_zoo", "save_tokenizer",
           "vocabulary"]
