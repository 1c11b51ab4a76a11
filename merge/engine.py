"""Running a merge plan: stream tensor by tensor from the inputs to sharded output.

Reading the next tensor's inputs (a background thread), the arithmetic (torch, on the
CPU's cores or on CUDA) and writing (the shard writer's thread) overlap. Memory holds
a few copies of the current tensors and the writer's small queue, whatever the model
size. Output goes to a temporary folder that is renamed into place only when complete.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from zoo.checkpoints.reader import DTYPE_SIZES, HEADS_FILE
from zoo.errors import NonFiniteValues, ZooError
from zoo.memory import keep_freed_memory
from zoo.checkpoints.readahead import read_ahead
from zoo.progress import Advance, ProgressFactory, ignore, no_progress

from zoo.merge.methods import TensorContext, slices
from zoo.merge.plan import Plan, read_input
from zoo.checkpoints.writer import DEFAULT_SHARD_BYTES, OutTensor, ShardWriter, plan_shards, tensor_bytes, write_file

TORCH_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
COMPUTE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}



def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ZooError("--device cuda: no CUDA device is available; use --device cpu or auto")
    if device not in ("cpu", "cuda"):
        raise ZooError(f"--device must be auto, cpu or cuda, not {device!r}")
    return torch.device(device)



CHUNK_ELEMS = 1 << 18  # elements per piece: float32 work buffers that stay in the CPU cache
# On CUDA a piece is a few transfers and kernel launches: larger pieces amortise them.
CUDA_CHUNK_ELEMS = 1 << 22
# Tensors up to this size are read once and kept whole when a method needs whole-tensor
# statistics (TIES thresholds); bounds memory at about 10 copies of it in float32.
STATS_WHOLE_ELEMS = 1 << 24


def execute(plan: Plan, folder: Path, *, device: str = "auto", shard_bytes: int = DEFAULT_SHARD_BYTES,
            progress: ProgressFactory = no_progress, label: str = "model",
            chunk_elems: int | None = None, merged: "dict[str, torch.Tensor] | None" = None,
            model_stats: dict[str, Any] | None = None) -> dict[str, str]:
    """Write the merged model into ``folder`` (which must exist and be empty).

    Tensors are copied, merged whole, or (for elementwise methods) streamed in pieces
    of ``chunk_elems`` so memory stays small whatever the tensor size. A method that
    needs statistics over the whole model (TIES with ``trim: global``) first gets its
    own streaming passes over every merged tensor. ``progress`` gets a bar for those
    passes and one for the merge, in bytes and tensors; the merge bar also moves through
    a streamed tensor's own statistics passes (TIES' thresholds). Returns the sha256 of every
    file written, keyed by its name in the folder. ``merged`` gives merged tensors
    already computed (a learned merge's), written in place of the method's.
    ``model_stats`` reaches every tensor's merge as ``ctx.stats`` (a data-aware merge's
    per-expert statistics, ``merge.statistics``), in place of the method's own passes.
    """
    dev = pick_device(device)
    keep_freed_memory()
    chunk = chunk_elems or (CUDA_CHUNK_ELEMS if dev.type == "cuda" else CHUNK_ELEMS)
    bufs = None
    if merged is None and model_stats is None:
        model_stats, bufs = _model_stats(plan, dev, chunk, progress, label)
    advance = progress(f"merging {label}", nbytes_total(plan), len(plan.steps))
    shards = plan_shards([s.out for s in plan.steps], shard_bytes)
    writer = ShardWriter(folder, shards)
    try:
        for step in plan.steps:
            name = step.out.name
            part = step.part or plan  # a slices recipe's tensor: its slice layer's sources and parameters
            if not step.merge:
                writer.put(_base_ckpt(part).read_bytes(name))
            elif merged is not None:
                writer.put(tensor_bytes(merged[name].to(TORCH_DTYPES[step.out.dtype])))
            elif _streamable(part, name):
                bufs = _merge_chunked(part, step.out, dev, writer, chunk, bufs, model_stats, advance)
                continue  # the tensor's bytes were reported as its passes went
            else:
                _merge_whole(part, step.out, dev, writer, model_stats)
            advance(step.out.nbytes, 1)
        digests = writer.close()
    except BaseException:
        writer.abort()
        raise
    digests.update(_write_heads(plan, folder))
    return digests


def _streamable(plan: Plan, name: str) -> bool:
    """Elementwise methods stream in pieces, except over LoRA tensors (B·A is made whole)."""
    shape = tuple(_base_ckpt(plan).tensors[name].shape)
    return plan.method.streams(name, shape, plan.options(name)) and \
        not any(m.is_adapter and name in m.lora for m in plan.models) and \
        not any(m.adapter is not None and (name in m.lora or name in m.overrides) for m in plan.models) and \
        not (plan.vocab is not None and name in plan.vocab.tensors)  # rows moved whole: merge/vocab.py


def _model_stats(plan: Plan, dev: torch.device, chunk: int, progress: ProgressFactory,
                 label: str) -> "tuple[dict | None, _Buffers | None]":
    """Statistics over all merged tensors together, gathered in streaming passes before
    anything is written (None when the method needs none)."""
    merged = [(s.out, s.part or plan) for s in plan.steps if s.merge]
    collector = plan.method.model_collector(
        [(p.model_params(o.name), p.options(o.name), math.prod(o.shape)) for o, p in merged])
    if collector is None:
        return None, None
    scan = progress(f"scanning {label} ({collector.passes} passes)",
                    collector.passes * sum(o.nbytes for o, _ in merged), collector.passes * len(merged))
    bufs = None

    def every_piece():
        nonlocal bufs
        for o, p in merged:
            if _streamable(p, o.name):
                pieces, bufs, _ = _pieces(p, o.name, dev, chunk, bufs, whole=False)
                yield from pieces()
            else:
                yield _whole_inputs(p, o.name, dev)
            scan(o.nbytes, 1)

    return collector.gather(every_piece), bufs


def _base_ckpt(plan: Plan):
    return plan.base.ckpt if plan.base is not None else plan.models[0].ckpt


class _Buffers:
    """Reused per-piece buffers: raw bytes and compute copies of each input, and a ring
    of output buffers long enough that the writer is done with one before it is reused.
    Raw buffers and the second set hold a piece (``raw_size`` elements); the first
    compute set holds ``size``, a whole tensor when one is held. For CUDA the raw
    buffers are page-locked, so the copies to the GPU go at DMA speed."""

    def __init__(self, n_inputs: int, size: int, compute: torch.dtype, dev: torch.device, ring: int,
                 in_bytes: int, raw_size: int):
        pin = dev.type == "cuda"
        self.raw = [torch.empty(raw_size * in_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(n_inputs)]
        self.work = [torch.empty(size, dtype=compute, device=dev) for _ in range(n_inputs)]
        # a second set, filled by the reader thread while the first is merged
        self.raw2 = [torch.empty(raw_size * in_bytes, dtype=torch.uint8, pin_memory=pin) for _ in range(n_inputs)]
        self.work2 = [torch.empty(raw_size, dtype=compute, device=dev) for _ in range(n_inputs)]
        self.out = [torch.empty(CHUNK_ELEMS * 8, dtype=torch.uint8) for _ in range(ring)]
        self.next_out = 0
        self.in_bytes = in_bytes

    def output(self, t: torch.Tensor, dtype: torch.dtype):
        """``t`` cast to ``dtype``, piece by piece through the ring, as bytes for the writer
        (from a GPU: cast there and brought back in one copy)."""
        if t.device.type != "cpu":
            yield tensor_bytes(t.to(dtype))
            return
        item = torch.empty(0, dtype=dtype).element_size()
        t = t.reshape(-1)
        for off in range(0, t.numel(), CHUNK_ELEMS):
            part = t[off:off + CHUNK_ELEMS]
            buf = self.out[self.next_out]
            self.next_out = (self.next_out + 1) % len(self.out)
            n = part.numel() * item
            buf[:n].view(dtype).copy_(part)
            yield memoryview(buf[:n].numpy())


def _pieces(plan: Plan, name: str, dev: torch.device, chunk: int, bufs: "_Buffers | None", whole: bool,
            deltas: bool = False):
    """A function that yields (base, [model tensors]) piece by piece for one tensor, in
    the compute dtype, each piece prefetched while the previous one is worked on; with
    ``whole`` the tensor is read once, held (with ``deltas``: each model minus the base),
    and every call walks it again. Also returns the buffers, for the next tensor to
    reuse, and the held (base, [models]) or None."""
    compute = plan.compute_dtype(name)
    base_ck = _base_ckpt(plan)
    numel = base_ck.tensors[name].numel
    has_base = plan.base is not None
    inputs, names = _inputs(plan, name)
    size = max(chunk, numel) if whole else chunk
    in_bytes = max(DTYPE_SIZES[ck.tensors[n].dtype] for ck, n in zip(inputs, names) if n is not None)
    if bufs is None or len(bufs.work) != len(inputs) or bufs.work[0].numel() < size or bufs.in_bytes < in_bytes \
            or bufs.raw[0].numel() < chunk * in_bytes or bufs.work2[0].numel() < chunk \
            or bufs.work[0].dtype != compute:
        bufs = _Buffers(len(inputs), size, compute, dev, ShardWriter.QUEUE_DEPTH + 2, in_bytes, chunk)
    sets = [(bufs.raw, bufs.work), (bufs.raw2, bufs.work2)]

    def read_into(raw, work_bufs, start: int, n: int, at: int, minus_base: bool) -> None:
        """Elements [start, start + n) of every input into ``work_bufs[i][at:at + n]``."""
        for i, (ck, src) in enumerate(zip(inputs, names)):
            w = work_bufs[i][at:at + n]
            if src is None:  # an adapter that leaves this tensor alone: the base's value
                w.copy_(work_bufs[0][at:at + n])
            else:
                piece = ck.read_range(src, start, n, out=raw[i])
                # to the GPU as stored (a plain DMA), converted there: a copy that also
                # converts does it on the CPU first (H200: 1.94 ms against 0.25 ms a piece)
                w.copy_(piece if w.device == piece.device else piece.to(w.device))
            if minus_base and i > 0:
                w.sub_(work_bufs[0][at:at + n])

    def load(k: int, start: int):
        raw, work_bufs = sets[k]
        n = min(size, numel - start)
        read_into(raw, work_bufs, start, n, 0, False)
        return (work_bufs[0][:n] if has_base else None), [w[:n] for w in work_bufs[1:]]

    held = None
    if whole:  # read and converted in cache-sized pieces, so each subtraction finds its inputs in cache
        for off in range(0, numel, chunk):
            read_into(bufs.raw, bufs.work, off, min(chunk, numel - off), off, deltas)
        held = (bufs.work[0][:numel] if has_base else None), [w[:numel] for w in bufs.work[1:]]

    def pieces():
        if held is not None:  # read once; then walked in cache-sized slices, much faster than whole-tensor ops
            yield from slices(*held, chunk)
            return
        yield from read_ahead(load, range(0, numel, size))

    return pieces, bufs, held


def _sample(plan: Plan, name: str, dev: torch.device, blocks: int = 256, block: int = 256):
    """The same entries of the base's and each model's tensor, in the compute dtype: up
    to ``blocks`` runs of ``block`` elements spread evenly over it (a few hundred small
    reads), so a collector can plan its passes before streaming the tensor."""
    compute = plan.compute_dtype(name)
    base_ck = _base_ckpt(plan)
    numel = base_ck.tensors[name].numel
    block = min(block, numel)
    starts = sorted({i * (numel - block) // max(1, blocks - 1) for i in range(blocks)})
    parts = []
    for ck, src in zip(*_inputs(plan, name)):
        if src is None:  # an adapter that leaves the tensor alone: the base's values
            ck, src = base_ck, name
        parts.append(torch.cat([ck.read_range(src, s, block).to(dev, compute) for s in starts]))
    return (parts[0] if plan.base is not None else None), parts[1:]


def _inputs(plan: Plan, name: str) -> "tuple[list, list[str | None]]":
    """The checkpoints one tensor is read from (the base first) and its name in each;
    None where an adapter leaves the tensor alone."""
    return ([_base_ckpt(plan), *[m.ckpt for m in plan.models]],
            [name, *[(m.overrides.get(name) if m.is_adapter else name) for m in plan.models]])


def _merge_chunked(plan: Plan, out: OutTensor, dev: torch.device, writer: ShardWriter, chunk: int,
                   bufs: "_Buffers | None" = None, model_stats: dict | None = None,
                   advance: Advance = ignore) -> "_Buffers":
    """Merge one tensor piece by piece; returns the buffers for the next tensor to reuse.
    ``advance`` gets the tensor's bytes as its statistics passes and its merge pass go."""
    name = out.name
    numel = math.prod(out.shape)
    params, options = plan.model_params(name), plan.options(name)
    chunk = plan.method.piece_elems(tuple(out.shape), options, chunk)  # row-wise methods: whole rows
    collector = None if model_stats is not None else \
        plan.method.tensor_collector(tuple(out.shape), params, options, TensorContext(name, plan.recipe.seed))
    # A tensor whose statistics need extra passes is read once and kept whole when it is
    # small enough; only the largest (embeddings) are streamed again for each pass.
    whole = collector is not None and numel <= STATS_WHOLE_ELEMS
    # a tensor held whole becomes task vectors once, for every pass and the merge
    deltas = whole and plan.method.accepts_deltas and plan.base is not None
    pieces, bufs, held = _pieces(plan, name, dev, chunk, bufs, whole, deltas)
    streamed_passes = collector is not None and held is None
    meter = _Meter(advance, out.nbytes, numel, lambda: 1 + (collector.passes if streamed_passes else 0))
    stats = model_stats
    if held is not None:
        stats = collector.gather_whole(*held, deltas, chunk)
    elif collector is not None:
        collector.use_sample(*_sample(plan, name, dev))
        stats = collector.gather(meter.metered(pieces), deltas)
    ctx = TensorContext(name, plan.recipe.seed, stats, scratch=True, deltas=deltas)
    out_dtype = TORCH_DTYPES[out.dtype]
    watch = FiniteWatch(plan, name, dev)
    with _single_thread(dev.type == "cpu" and not whole):
        for b, xs in pieces():
            watch.inputs(b, xs)  # before merge, which may overwrite them
            merged = plan.method.merge(b, xs, params, options, ctx)
            watch.output(merged)
            for data in bufs.output(merged, out_dtype):
                writer.put(data)
            meter.walked(xs[0].numel())
    watch.check()
    meter.finish()
    return bufs


class FiniteWatch:
    """Refuses NaN and infinities, in any input or in the merge, naming the tensor.

    It keeps one running sum per input and one for the merged values, on the compute
    device: a NaN or an infinity anywhere makes its sum non-finite (finite weights never
    sum to 1e38), so the only cost is one reduction per piece, read from cache, and one
    device sync per tensor."""

    def __init__(self, plan: Plan, name: str, dev: torch.device):
        self.plan, self.name = plan, name
        self.sums = torch.zeros(len(plan.models) + 2, dtype=torch.float64, device=dev)

    def inputs(self, base: torch.Tensor | None, xs: list[torch.Tensor]) -> None:
        zero = self.sums.new_zeros(())
        self.sums[:-1] += torch.stack([base.sum() if base is not None else zero, *(x.sum() for x in xs)])

    def output(self, merged: torch.Tensor) -> None:
        self.sums[-1] += merged.sum()

    def check(self) -> None:
        if bool(torch.isfinite(self.sums).all()):
            return
        labels = [f"the base {self.plan.base.label}" if self.plan.base is not None else "the base",
                  *(m.label for m in self.plan.models)]
        for label, s in zip(labels, self.sums[:-1].tolist()):
            if not math.isfinite(s):
                raise NonFiniteValues(self.name, label)
        raise ZooError(f"merging {self.name} gave NaN or infinite values although every input is finite; "
                       "nothing was written. Try a smaller weight or lambda, or compute in float32")


class _Meter:
    """One streamed tensor's share of the merge bar (its bytes), spread over its walks:
    each statistics pass (TIES' thresholds: one to three) and the merge pass, so the bar
    moves while a large tensor is scanned. The walks are counted as they are planned
    (``walks()``; a pass added late only slows the bar), and ``finish`` reports the
    rest, so the tensor's total is exact."""

    def __init__(self, advance: Advance, nbytes: int, numel: int, walks: Callable[[], int]):
        self.advance, self.nbytes, self.numel, self.walks = advance, nbytes, max(1, numel), walks
        self.elements = 0
        self.reported = 0

    def walked(self, n: int) -> None:
        self.elements += n
        due = min(self.nbytes, self.nbytes * self.elements // (self.walks() * self.numel))
        if due > self.reported:
            self.advance(due - self.reported)
            self.reported = due

    def metered(self, pieces: Callable[[], Iterable]) -> Callable[[], Iterator]:
        """``pieces`` counting each piece once the consumer is done with it."""
        def walk() -> Iterator:
            for piece in pieces():
                yield piece
                self.walked(piece[1][0].numel())
        return walk

    def finish(self) -> None:
        self.advance(self.nbytes - self.reported, 1)
        self.reported = self.nbytes




@contextmanager
def _single_thread(on: bool):
    """Small pieces run faster on one torch thread: with the writer thread beside it on
    few cores, OpenMP's parallel regions cost more than they save (measured on 2 cores:
    11.8 s against 13.5 s for the 1B task-arithmetic benchmark)."""
    if not on:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _whole_inputs(plan: Plan, name: str, dev: torch.device):
    """The base's and each model's whole tensor, in the compute dtype on ``dev``."""
    compute = plan.compute_dtype(name)
    b_raw = _base_ckpt(plan).read_tensor(name)
    xs = [read_input(m, name, b_raw).to(dev, compute) for m in plan.models]
    b = b_raw.to(dev, compute) if plan.base is not None else None
    if plan.vocab is not None and name in plan.vocab.tensors:  # each input's rows on the merged vocabulary
        b, xs = plan.vocab.align(b, plan.base.label if plan.base is not None else None, xs,
                                 [m.label for m in plan.models])
    return b, xs


def _merge_whole(plan: Plan, out: OutTensor, dev: torch.device, writer: ShardWriter,
                 model_stats: dict | None = None) -> None:
    name = out.name
    b, xs = _whole_inputs(plan, name, dev)
    watch = FiniteWatch(plan, name, dev)
    watch.inputs(b, xs)
    merged = plan.method.merge(b, xs, plan.model_params(name), plan.options(name),
                               TensorContext(name, plan.recipe.seed, model_stats))
    watch.output(merged)
    watch.check()
    writer.put(tensor_bytes(merged.to(TORCH_DTYPES[out.dtype])))


def _write_heads(plan: Plan, folder: Path) -> dict[str, str]:
    """Each model's task head, kept unmerged, so the merge can be evaluated per task."""
    entries: dict[str, Any] = {}
    tensors: list[tuple[str, torch.Tensor]] = []
    for i, m in enumerate(plan.models):
        names = plan.heads.get(i) or []
        if not names:
            continue
        key = m.ref.split("@")[0] if m.ref else f"model{i}"
        cfg = m.ckpt.config if m.ckpt.form == "model" else None
        entries[key] = {"model": m.ref or m.label, "tasks": m.tasks, "tensors": names,
                        "id2label": (cfg or {}).get("id2label")}
        for n in names:
            src = m.overrides.get(n, n) if m.is_adapter else n
            t = m.ckpt.read_tensor(src)
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise NonFiniteValues(n, m.ref or m.label)
            tensors.append((f"{key}/{n}", t))
    if not tensors:
        return {}
    from zoo.checkpoints.writer import header_bytes

    outs = [OutTensor(n, _st_dtype(t), tuple(t.shape)) for n, t in tensors]
    data = header_bytes(outs, {"format": "pt", "zoo_heads": json.dumps(entries, sort_keys=True)})
    data += b"".join(bytes(tensor_bytes(t)) for _, t in tensors)
    return {HEADS_FILE: write_file(folder / HEADS_FILE, data)}


def _st_dtype(t: torch.Tensor) -> str:
    for k, v in TORCH_DTYPES.items():
        if v == t.dtype:
            return k
    raise ZooError(f"cannot store a {t.dtype} head tensor")



def nbytes_total(plan: Plan) -> int:
    return sum(s.out.nbytes for s in plan.steps)

