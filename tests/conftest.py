"""Shared fixtures: real tiny checkpoints built from transformers configs, and a
registry on a real SQLite file in a temporary folder, or (``target``, parametrised)
on both SQLite and a real PostgreSQL server started for the session (tests/postgres.py)."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

# A shell that starts the suite in the background (`cmd &` without job control) leaves
# SIGINT ignored, and every child would inherit that, so the Ctrl-C tests would see
# commands that cannot be interrupted. Handling it here makes children start with the
# default, whatever started the suite.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
from safetensors.torch import save_file

from zoo import Registry
from zoo.checkpoints.taskdata import save_task_data


def vit(path: Path, num_labels: int = 10, seed: int = 0, hidden: int = 32) -> Path:
    """A tiny ViT image classifier, saved as a Hugging Face folder."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=8, patch_size=2, num_channels=1, hidden_size=hidden, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=2 * hidden,
                    id2label={i: str(i) for i in range(num_labels)}, label2id={str(i): i for i in range(num_labels)})
    ViTForImageClassification(cfg).save_pretrained(path)
    return path


def llama(path: Path, seed: int = 0, vocab: int = 128, tie: bool = False, shard: str | None = None,
          dtype: torch.dtype = torch.float32) -> Path:
    """A tiny LLaMA with GQA; ``shard`` (e.g. "20KB") writes several shards and an index."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    model = LlamaForCausalLM(cfg).to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    model.save_pretrained(path, **kwargs)
    return path


def lora_adapter(path: Path, base: Path, r: int = 4, seed: int = 0, targets=("q_proj", "v_proj"),
                 bad_shape: bool = False) -> Path:
    """A PEFT-layout LoRA adapter for a LLaMA base, written directly with safetensors."""
    from zoo import open_checkpoint

    g = torch.Generator().manual_seed(seed)
    b = open_checkpoint(base)
    tensors = {}
    for name, info in b.tensors.items():
        if name.endswith(".weight") and any(f".{t}." in name for t in targets):
            module = name[: -len(".weight")]
            out_f, in_f = info.shape
            tensors[f"base_model.model.{module}.lora_A.weight"] = torch.randn(r, in_f + (1 if bad_shape else 0), generator=g)
            tensors[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_f, r, generator=g)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": list(targets),
        "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM"}))
    return path


def expert_family(root: Path, n: int = 3, dtype=torch.bfloat16, scale: float = 0.02) -> tuple[Path, list[Path]]:
    """A tiny LLaMA base (sharded) and ``n`` experts: the base plus seeded noise."""
    from safetensors.torch import load_file, save_file

    base = llama(root / "base", seed=0, dtype=dtype, shard="30KB")
    experts = []
    for i in range(n):
        p = llama(root / f"e{i}", seed=0, dtype=dtype)
        sd = load_file(str(p / "model.safetensors"))
        g = torch.Generator().manual_seed(10 + i)
        save_file({k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype) for k, v in sd.items()},
                  str(p / "model.safetensors"), metadata={"format": "pt"})
        experts.append(p)
    return base, experts


def db_dump(path: Path) -> list[str]:
    """Every row of the registry database, for before/after comparisons."""
    if not path.exists():
        return []
    con = sqlite3.connect(path)
    try:
        return list(con.iterdump())
    finally:
        con.close()


def store_listing(reg_path: Path) -> list[str]:
    root = reg_path.with_suffix(".store") / "blobs"
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="session")
def pg_server():
    """A private PostgreSQL server for the session, started on first use; the tests that
    need it skip with the reason when the server binaries cannot be had."""
    from postgres import PrivateServer, ensure_binaries

    bindir, why = ensure_binaries()
    if bindir is None:
        pytest.skip(why)
    server = PrivateServer(bindir).start()
    yield server
    server.stop()


@dataclass
class Target:
    """One registry for a test: a SQLite file, or a fresh database on the session's server
    with its store in the same place a SQLite registry's would be."""

    kind: str
    arg: str  # what --registry gets
    store: Path
    env: dict[str, str] = field(default_factory=dict)  # what a subprocess needs besides --registry

    @property
    def cli(self) -> list[str]:
        return ["--registry", self.arg] + (["--store", str(self.store)] if self.kind == "postgresql" else [])

    def open(self, create: bool = True) -> Registry:
        return Registry(self.arg, create=create, store=self.store if self.kind == "postgresql" else None)

    def dump(self) -> list[str]:
        """Every row of every table, for before/after comparisons."""
        if self.kind == "sqlite":
            return db_dump(Path(self.arg))
        import psycopg

        rows = []
        with psycopg.connect(self.arg) as con:
            tables = [r[0] for r in con.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public' "
                                                "ORDER BY tablename")]
            for t in tables:
                rows += sorted(f"{t}: {r!r}" for r in con.execute(f'SELECT * FROM "{t}"'))
        return rows

    def blobs(self) -> list[str]:
        root = self.store / "blobs"
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) if root.exists() else []


@pytest.fixture(params=["sqlite", "postgresql"])
def target(request, tmp_path: Path) -> Target:
    """A registry location, once on SQLite and once on PostgreSQL (nothing made yet)."""
    if request.param == "sqlite":
        yield Target("sqlite", str(tmp_path / "registry.db"), tmp_path / "registry.store")
        return
    server = request.getfixturevalue("pg_server")
    url = server.create_database()
    store = tmp_path / "registry.store"
    yield Target("postgresql", url, store, {"ZOO_STORE": str(store)})
    server.drop_database(url)


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    reg = Registry(tmp_path / "registry.db", create=True)
    yield reg
    reg.close()


@pytest.fixture
def models(tmp_path: Path) -> dict[str, Path]:
    """A ViT base, two experts with their own heads, and a mismatched one."""
    root = tmp_path / "models"
    return {
        "base": vit(root / "base", 10, seed=0),
        "parity": vit(root / "parity", 2, seed=1),
        "mod3": vit(root / "mod3", 3, seed=2),
        "wide": vit(root / "wide", 2, seed=3, hidden=48),
    }


@pytest.fixture
def zoo_cli(tmp_path: Path, monkeypatch, capsys):
    """Run the real CLI entry point in-process; returns (exit code, stdout, stderr)."""
    from zoo.cli.main import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("ZOO_REGISTRY", raising=False)

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["zoo", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def subprocess_env(tmp_path: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("ZOO_REGISTRY", None)
    env["ZOO_CACHE"] = str(tmp_path / "cache")
    return env


LABELS = [2, 3, 4]  # the tiny fixture's experts: heads of 2, 3 and 4 labels


def perturbed_expert(base_dir, out, num_labels: int, seed: int):
    from transformers import ViTForImageClassification

    from transformers.utils import logging

    logging.set_verbosity_error()
    m = ViTForImageClassification.from_pretrained(base_dir, num_labels=num_labels, ignore_mismatched_sizes=True)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    m.save_pretrained(out)
    return out


@pytest.fixture
def tiny(tmp_path, registry):
    """A tiny ViT base and three experts (heads of 2, 3, 4 labels), each task registered
    with data (train / val / test splits of random 8x8 images)."""
    base = vit(tmp_path / "base", num_labels=10, seed=0)
    registry.add(base, "base", "base")
    experts = []
    g = torch.Generator().manual_seed(1)
    for i, k in enumerate(LABELS):
        e = perturbed_expert(base, tmp_path / f"e{i}", k, seed=100 + i)
        splits = {s: (torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, k, (n,), generator=g))
                  for s, n in (("train", 48), ("val", 32), ("test", 32))}
        save_task_data(tmp_path / f"t{i}.safetensors", splits, [str(j) for j in range(k)])
        registry.add_task(f"t{i}", [str(j) for j in range(k)], data=tmp_path / f"t{i}.safetensors")
        registry.add(e, f"e{i}", "expert", base="base", tasks=[f"t{i}"])
        experts.append(e)
    return base, experts
