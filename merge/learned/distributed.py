"""Learned merges across processes with ``torch.distributed``: under ``torchrun`` or
``zoo merge --nproc K`` every process holds the whole merge and draws the same seeded
batches; each takes its share of every task's batch, and the gradients of what trains
(coefficients, mask logits, parity offsets) are summed across processes, each process's
loss weighted by its share, so a step is one process's step up to the order of float
sums (data parallelism as in PyTorch DDP, Li et al., arXiv 2006.15704).

``Sync`` is what the loops call: ``share`` on the batch draw, ``weigh`` on a task's
loss, ``reduce`` after the backward. Alone (no process group) each of them does
nothing, so one process runs exactly as before. Rank 0 alone writes and registers the
result; the others wait for it (``session``). ``launch`` is ``--nproc``: it starts the
processes itself, passes rank 0's output through and reports one error.
"""

from __future__ import annotations

import datetime
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from zoo.errors import ZooError

# A process that stopped because another one did exits with this status, silently: the
# launcher reports the process that stopped first, not the others.
PEER_STOPPED = 3
# How long a collective waits for the other processes (rank 0 writing the result included).
TIMEOUT = datetime.timedelta(hours=2)
# After Ctrl-C, how long every process gets to clean up and stop.
INTERRUPTED = 30.0
# How a launcher tells a process that another one failed: it stops, cleaning up, silently.
STOP = signal.SIGUSR1
# After the first process fails, how long the others get to stop on their own.
GRACE = 3.0


class PeerStopped(SystemExit):
    """Another process of the group stopped (an error, Ctrl-C): this one stops too,
    without a message of its own."""

    def __init__(self) -> None:
        super().__init__(PEER_STOPPED)


@dataclass(frozen=True)
class Sync:
    """One process's place in a learned merge across ``world`` processes (rank 0 of 1:
    alone, and every method a no-op). ``backend``: the process group ``session`` joins
    at the first collective (None: one already running)."""

    rank: int = 0
    world: int = 1
    backend: str | None = None

    @property
    def writes(self) -> bool:
        """Whether this process writes and registers the result (rank 0)."""
        return self.rank == 0

    def share(self, n: int, empty: bool = False) -> slice:
        """This process's rows of a batch of ``n``: the rank-th of ``world`` contiguous
        blocks, sizes differing by at most one. Unless ``empty``, every process needs a
        row: the same one-line error on every process otherwise."""
        if self.world > 1 and n < self.world and not empty:
            raise ZooError(f"a batch of {n} example(s) cannot be split across {self.world} processes; raise "
                           f"batch_size (and give each task at least {self.world} examples) or use fewer processes")
        return slice(self.rank * n // self.world, (self.rank + 1) * n // self.world)

    def fraction(self, local: int, total: int) -> float:
        """This process's ``local`` of a batch's ``total`` rows (1 alone, or for no rows)."""
        return 1.0 if self.world == 1 or total == 0 else local / total

    def weigh(self, loss: torch.Tensor, local: int, total: int) -> torch.Tensor:
        """A mean over ``local`` of ``total`` rows, as its share of the mean over all: the
        sum over processes is then the mean over the whole batch."""
        return loss if self.world == 1 else loss * self.fraction(local, total)

    def reduce(self, opt: torch.optim.Optimizer, loss: torch.Tensor | None) -> torch.Tensor:
        """After the backward: every parameter ``opt`` steps gets the sum of the
        processes' gradients (None where no process had one, as alone), and the summed
        loss comes back (None: this process had no rows this step). One all-reduce."""
        if self.world == 1:
            assert loss is not None
            return loss
        import torch.distributed as dist

        params = [p for group in opt.param_groups for p in group["params"]]
        device = params[0].device
        grads = [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        flags = torch.tensor([float(p.grad is not None) for p in params], device=device)
        value = (loss.detach().float().reshape(1) if loss is not None else torch.zeros(1, device=device))
        buffer = torch.cat([*grads, flags, value])
        del grads
        self.collective(dist.all_reduce, buffer)
        parts = buffer.split([p.numel() for p in params] + [len(params), 1])
        have = parts[len(params)].tolist()
        for p, g, has in zip(params, parts, have):
            p.grad = g.view_as(p).to(p.dtype) if has else None
        return parts[-1].reshape(())

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            self.collective(dist.barrier)

    def collective(self, op, *args) -> None:
        """A collective, the process group joined first where needed; where another
        process has gone (its error, Ctrl-C), ``PeerStopped``."""
        import torch.distributed as dist

        if not dist.is_initialized():
            assert self.backend is not None
            try:
                dist.init_process_group(self.backend, timeout=TIMEOUT)
            except (RuntimeError, ValueError) as e:
                raise ZooError(f"could not join the other processes: {str(e).splitlines()[0]}") from None
        try:
            op(*args)
        except RuntimeError as e:  # gloo and NCCL: the connection to a stopped process broke
            raise PeerStopped() from e


def _stop(signum, frame) -> None:
    raise PeerStopped()


_session: Sync | None = None  # the one ``session`` opened in this process


def current() -> Sync:
    """This process's ``Sync``: the open ``session``'s, else its rank in a process group
    research code started itself (``init_process_group``), else alone."""
    if _session is not None:
        return _session
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Sync(dist.get_rank(), dist.get_world_size())
    return Sync()


def launched() -> int:
    """The number of processes a launcher (torchrun, ``--nproc``) started, from its
    environment; 1 without one."""
    return int(os.environ.get("WORLD_SIZE", "1")) if "RANK" in os.environ else 1


@contextmanager
def session(device: str, nproc: int | None = None) -> Iterator[Sync]:
    """This process's place among the processes a launcher started (gloo on the CPU,
    NCCL on CUDA, one GPU per local rank); alone without a launcher. The process group
    is joined at the first collective, after the model is built: transformers writes
    nothing from a rank other than 0 while one runs, and zoo reads a model's names by
    writing it. On success every process waits at the end until rank 0 has written the
    result."""
    global _session
    world = launched()
    if nproc is not None and nproc < 1:
        raise ZooError("--nproc must be at least 1")
    if nproc is not None and nproc > 1 and world != nproc:
        raise ZooError(f"--nproc {nproc}, but the launcher started {world} process(es); give one of them")
    if world == 1:
        yield Sync()
        return
    import torch.distributed as dist

    if not dist.is_available():
        raise ZooError("this torch has no torch.distributed; run one process")
    cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise ZooError(f"local rank {local} has no GPU of its own ({torch.cuda.device_count()} visible); "
                           "start at most one process per GPU")
        torch.cuda.set_device(local)
    _session = Sync(int(os.environ["RANK"]), world, "nccl" if cuda else "gloo")
    previous = signal.signal(STOP, _stop)
    try:
        yield _session
        _session.barrier()  # the others wait until rank 0 has written and registered the result
    finally:
        _session = None
        signal.signal(STOP, previous)
        if dist.is_initialized():
            dist.destroy_process_group()


# -- --nproc: start the processes here ----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_setup() -> None:
    """In each started process: Ctrl-C raises KeyboardInterrupt (whatever the shell's
    disposition), and the launcher's death interrupts it (Linux), so nothing runs on
    unwatched."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGINT)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _last_line(path: Path) -> str:
    """The failed process's error line (or, after a traceback, the exception's line)."""
    lines = [x for x in (path.read_text(errors="replace").splitlines() if path.exists() else []) if x.strip()]
    if not lines:
        return "it stopped without a message"
    last = lines[-1]
    return last[len("error: "):] if last.startswith("error: ") else f"{last.strip()} (a bug: please report it)"


def launch(argv: Sequence[str], nproc: int, threads: int | None = None) -> int:
    """Run ``python -m zoo.cli.main ARGV`` as ``nproc`` processes on this machine (the
    environment torchrun gives, on a free loopback port) and wait for them. Rank 0's
    output is this command's; the others' is kept aside. The first process to fail
    stops the rest: its error is the one line reported (a ``ZooError``), and Ctrl-C
    interrupts every process, so none leaves anything half-written. Returns rank 0's
    exit status."""
    if nproc < 1:
        raise ZooError("--nproc must be at least 1")
    per = threads or max(1, (os.cpu_count() or 1) // nproc)
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="zoo-nproc-") as tmp:
        logs = [Path(tmp) / f"rank{r}.err" for r in range(nproc)]
        procs: list[subprocess.Popen] = []
        for r in range(nproc):
            env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(nproc),
                   "LOCAL_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
            env.setdefault("OMP_NUM_THREADS", str(per))
            quiet = r > 0
            err = open(logs[r], "wb") if quiet else None
            try:
                procs.append(subprocess.Popen([sys.executable, "-m", "zoo.cli.main", *argv], env=env,
                                              stdout=subprocess.DEVNULL if quiet else None, stderr=err,
                                              start_new_session=True, preexec_fn=_child_setup))
            finally:
                if err is not None:
                    err.close()
        try:
            codes = _wait(procs, GRACE)
        except KeyboardInterrupt:  # Ctrl-C reaches this process alone (the others have their own session)
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGINT)
            codes = _wait(procs, INTERRUPTED)
            if codes[0] != 130:  # rank 0 has not said so itself
                raise
            return 130
        return _outcome(codes, logs)


def _outcome(codes: list[int], logs: list[Path]) -> int:
    """Rank 0's exit status when it failed first and said so itself, or all went well;
    else the first failed process's error, as one line (``ProcessFailed``)."""
    if all(c == 0 for c in codes):
        return 0
    n = len(codes)
    first = next((r for r, c in enumerate(codes) if c not in (0, PEER_STOPPED)), None)
    if first is None:
        raise ProcessFailed(f"the {n} processes stopped without saying why")
    if codes[first] < 0:
        raise ProcessFailed(f"process {first} of {n} was killed (signal {-codes[first]})")
    if first == 0:
        return codes[0]  # rank 0 printed its own error
    raise ProcessFailed(f"process {first} of {n}: {_last_line(logs[first])}")


class ProcessFailed(ZooError):
    """One of ``--nproc``'s processes failed; its message is the one reported."""


def _wait(procs: list[subprocess.Popen], grace: float) -> list[int]:
    """Every process's exit status. Once one has failed the others get ``grace`` seconds
    to stop on their own (a broken connection tells them), then ``STOP``, then a kill;
    those stopped so count as ``PEER_STOPPED``."""
    failed_at = None
    stopped: set[int] = set()
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return [PEER_STOPPED if r in stopped else int(c) for r, c in enumerate(codes)]  # type: ignore[arg-type]
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = time.monotonic()
        if failed_at is not None and time.monotonic() - failed_at > grace:
            for r, p in enumerate(procs):
                if p.poll() is None:
                    p.send_signal(STOP) if r not in stopped else p.kill()
                    stopped.add(r)
            failed_at = time.monotonic()  # a kill after another grace
        time.sleep(0.05)
