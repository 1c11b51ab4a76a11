"""Learned merges across processes (torch.distributed, gloo on the CPU): the rows each
process takes, gradients that sum to one process's, and real two-process runs of
AdaMerging (torchrun) and parity (``zoo merge --nproc 2``) against one process on the
tiny fixture; an error on every process, a killed process and Ctrl-C each give one
line and leave nothing behind.

Tolerance. Two processes compute the same loss and gradients as one, but with float32
sums in another order: each process runs the body on half the rows (a matmul of
another shape may block its sums differently) and the halves' gradients are added
afterwards. The gradients agree to about 1e-7 relative (the unit tests below check
the weighting itself exactly). Adam then divides each gradient by its running RMS, so a
coefficient whose gradient is at rounding level can move by a different fraction of
lr in a step; after the runs here coefficients differ by a few 1e-4 and parity's
trained norm offsets by a few 1e-3. One process run with another thread count
(OMP_NUM_THREADS=1 against 2) differs from itself by the same amounts (measured:
AdaMerging coefficients 1.4e-4, parity weights 2.5e-3), so that is the tolerance:
coefficients within 2e-3 and merged weights within 1e-2 absolute, with the losses
within 1e-5 relative and the parity sets (which samples train) identical.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import zoo.merge as merge
from zoo import open_checkpoint
from zoo.errors import ZooError
from zoo.merge.learned.distributed import Sync
from zoo.merge.learned.merger import Merger
from zoo.merge.learned.generative_parity import generative_loss
from zoo.merge.learned.parity import parity_loss
from zoo.merge.learned.train import Loop, Settings, TaskData
from zoo.merge.methods import get_method

COEF_ATOL, WEIGHT_ATOL, LOSS_RTOL = 2e-3, 1e-2, 1e-5
ADA = {"merge_method": "adamerging", "base_model": "base", "seed": 0,
       "models": [{"model": f"e{i}"} for i in range(3)], "parameters": {"steps": 12, "lr": 0.05}}
PARITY = {"merge_method": "parity", "base_model": "base", "seed": 0,
          "models": [{"model": f"e{i}"} for i in range(3)],
          "parameters": {"tau": 0.05, "view": "none", "rounds": 2, "steps": 10, "lr": 0.01, "keep": "last",
                         "train": "coefficients,params", "eval_split": "none"}}


# -- the split and the weights, in one process ----------------------------------------------------
@pytest.mark.parametrize("n,world", [(16, 2), (17, 3), (5, 4), (3, 3)])
def test_each_row_goes_to_exactly_one_process(n, world):
    rows = [list(range(n))[Sync(r, world).share(n)] for r in range(world)]
    assert sum(rows, []) == list(range(n))
    assert max(map(len, rows)) - min(map(len, rows)) <= 1


def test_a_batch_smaller_than_the_processes_is_refused():
    with pytest.raises(ZooError, match="cannot be split across 3 processes"):
        Sync(0, 3).share(2)
    assert Sync(2, 3).share(2, empty=True) == slice(1, 2)  # parity sets may leave a process none
    assert Sync(0, 3).share(2, empty=True) == slice(0, 0)


def _toy():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(5, generator=g)}
    tvs = [{k: 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    data = [TaskData(f"t{i}", {"x": torch.randn(n, 6, generator=g)}, torch.randint(0, 5, (n,), generator=g))
            for i, n in enumerate((40, 40, 11))]  # the last task has fewer examples than a batch

    def forward(t, p, b):
        return torch.tanh(b["x"] @ p["w"] + p["b"]) * (t + 1)
    return base, tvs, data, forward


@pytest.mark.parametrize("objective", ["entropy", "ce"])
@pytest.mark.parametrize("world", [2, 3])
def test_the_processes_gradients_sum_to_one_process(monkeypatch, objective, world):
    """Each process's loss is its rows' mean weighted by its share of the batch, so the
    summed gradients (what the all-reduce computes) are one process's, to rounding."""
    base, tvs, data, forward = _toy()
    s = Settings(objective=objective, steps=1, lr=0.1, batch_size=16, coefficients="layer", init=0.3)

    def grads(sync: Sync) -> tuple[torch.Tensor, float]:
        monkeypatch.setattr("zoo.merge.learned.train.current", lambda: sync)
        merger = Merger(base, tvs, coefficients="layer", init=0.3)
        loop = Loop(merger, forward, data, s)
        loss = loop.objective(merger.merged())
        loss.backward()
        return merger.weights.grad.clone(), float(loss.detach())

    alone, loss = grads(Sync())
    parts = [grads(Sync(r, world)) for r in range(world)]
    torch.testing.assert_close(sum(g for g, _ in parts), alone, rtol=1e-5, atol=1e-7)
    assert sum(x for _, x in parts) == pytest.approx(loss, rel=1e-6)


def _shares_sum_to_the_whole(student: torch.Tensor, whole: torch.Tensor, n_parity: int, n_agree: int, world: int,
                             part) -> None:
    """Each process takes its share of the parity rows and of the agreeing rows;
    ``part(sync, parity rows, agreeing rows)`` is its loss. Their losses and gradients
    (over ``student``) must sum to the ``whole`` batch's."""
    (expect,) = torch.autograd.grad(whole, student, retain_graph=True)
    total, grad = 0.0, torch.zeros_like(student)
    for r in range(world):
        sync = Sync(r, world)
        par = torch.arange(n_parity)[sync.share(n_parity, empty=True)]
        agree = n_parity + torch.arange(n_agree)[sync.share(n_agree, empty=True)]
        if len(par) + len(agree) == 0:
            continue
        loss = part(sync, par, agree)
        total += float(loss.detach())
        grad += torch.autograd.grad(loss, student)[0]
    assert total == pytest.approx(float(whole.detach()), rel=1e-6)
    torch.testing.assert_close(grad, expect, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("n_parity,n_agree,world", [(5, 7, 2), (1, 16, 2), (3, 2, 4), (16, 0, 3)])
def test_parity_loss_shares_sum_to_the_whole(n_parity, n_agree, world):
    """Parity's loss has two means (parity rows, agreeing rows): each weighted by the
    process's share of its rows, the processes' losses and gradients sum to the whole,
    a process with no parity rows (or none at all) included."""
    s = get_method("parity").settings({"kl_weight": 0.5, "agree_weight": 1.0})
    g = torch.Generator().manual_seed(n_parity)
    student = torch.randn(n_parity + n_agree, 4, generator=g).requires_grad_(True)
    teacher = torch.randn(n_parity + n_agree, 4, generator=g)

    def part(sync, par, agree):
        idx = torch.cat([par, agree])
        return parity_loss(student[idx], teacher[idx], len(par), s,
                           (sync.fraction(len(par), n_parity), sync.fraction(len(agree), n_agree)))
    _shares_sum_to_the_whole(student, parity_loss(student, teacher, n_parity, s), n_parity, n_agree, world, part)


@pytest.mark.parametrize("n_parity,n_agree,world", [(5, 7, 2), (1, 6, 2), (3, 2, 4), (6, 0, 3)])
def test_generative_parity_loss_shares_sum_to_the_whole(n_parity, n_agree, world):
    """The same over generated answers, whose terms are means over answer positions and
    whose rows have answers of different lengths: each process weighs a term by its share
    of that term's positions, and the losses and gradients sum to the whole."""
    s = get_method("parity").settings({"kl_weight": 0.5, "agree_weight": 1.0})
    g = torch.Generator().manual_seed(n_parity + 10 * n_agree)
    n = n_parity + n_agree
    lengths = torch.randint(1, 6, (n,), generator=g)  # scored positions per row: the answer and its end
    rows = torch.repeat_interleave(torch.arange(n), lengths)
    student = torch.randn(len(rows), 7, generator=g).requires_grad_(True)
    target = torch.randint(0, 7, (len(rows),), generator=g)
    teacher = torch.randn(len(rows), 7, generator=g).log_softmax(dim=-1)

    def part(sync, par, agree):
        idx = torch.cat([par, agree])
        at = torch.cat([(rows == i).nonzero().squeeze(1) for i in idx.tolist()])  # their positions, in order
        mine = torch.repeat_interleave(torch.arange(len(idx)), lengths[idx])
        shares = (sync.fraction(int(lengths[par].sum()), int(lengths[:n_parity].sum())),
                  sync.fraction(int(lengths[agree].sum()), int(lengths[n_parity:].sum())))
        return generative_loss(student[at], target[at], mine, len(par), teacher[at], s, shares)
    whole = generative_loss(student, target, rows, n_parity, teacher, s)
    _shares_sum_to_the_whole(student, whole, n_parity, n_agree, world, part)


# -- two real processes on a toy merge: every method's loop ---------------------------------------
TOY_SETTINGS = {"adamerging": {"coefficients": "layer"}, "concrete_ta": {},
                "concrete_adamerging": {"stage2_steps": 4}, "parity": {"batch_size": 5},
                # one parity row per task and step, no agreeing ones: rank 0's share is always empty
                "parity_one_row": {"batch_size": 1, "agree_weight": 0.0}}


def _toy_fit(method: str):
    """``method`` learned on the toy merge (parity: distilled, training coefficients and
    the mask), in whatever process group is running."""
    from zoo.merge.learned.parity import distill
    from zoo.merge.state_dicts import learn_merge

    base, tvs, data, forward = _toy()
    if not method.startswith("parity"):
        experts = [{k: base[k] + tv[k] for k in base} for tv in tvs]
        return learn_merge(torch.nn.Module(), base, experts, [{}] * 3, data, method, forward=forward, steps=6,
                           lr=0.01, batch_size=16, **TOY_SETTINGS[method])
    s = get_method("parity").settings({"tau": 0.05, "view": "none", "rounds": 2, "steps": 5, "lr": 0.01,
                                       "keep": "last", "train": "coefficients,mask", **TOY_SETTINGS[method]})
    merger = Merger(base, tvs, coefficients="layer", mask=".*")
    teachers = [lambda t=t: (lambda batch: forward(t, {k: base[k] + tvs[t][k] for k in base}, batch))
                for t in range(3)]
    return distill(merger, forward, teachers, data, s)


def _toy_rank(rank: int, world: int, port: int, out: str, method: str) -> None:
    from zoo.merge.learned.distributed import session

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    with session("cpu") as sync:
        result = _toy_fit(method)
    torch.save({"coefficients": result.coefficients, "merged": result.merged, "steps": result.steps_done,
                "losses": [h["loss"] for h in result.history], "world": sync.world}, f"{out}.{rank}")


@pytest.mark.parametrize("method", list(TOY_SETTINGS))
def test_every_learned_loop_in_two_processes_is_one_process(method, tmp_path):
    """AdaMerging, both Concrete loops and parity (coefficients and mask, with parity sets
    smaller than a batch, and with a share of a step left empty) in two gloo processes:
    both ranks end with the same bits, and those are one process's up to rounding (tiny
    sums here: within 1e-5)."""
    import torch.multiprocessing as mp

    from zoo.merge.learned.distributed import free_port

    torch.manual_seed(0)
    alone = _toy_fit(method)
    out = str(tmp_path / "result")
    mp.spawn(_toy_rank, args=(2, free_port(), out, method), nprocs=2)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    assert ranks[0]["world"] == 2
    for n in ranks[0]["merged"]:  # every process took the same steps
        assert torch.equal(ranks[0]["merged"][n], ranks[1]["merged"][n])
    two = ranks[0]
    assert two["steps"] == alone.steps_done
    assert two["losses"] == pytest.approx([h["loss"] for h in alone.history], rel=1e-5)
    torch.testing.assert_close(torch.tensor(two["coefficients"]), torch.tensor(alone.coefficients), rtol=0, atol=1e-5)
    for n, t in alone.merged.items():
        torch.testing.assert_close(two["merged"][n], t, rtol=0, atol=1e-5)


# -- two real processes -------------------------------------------------------------------------
def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("ZOO_REGISTRY", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["ZOO_CACHE"] = str(tmp_path / "cache")
    env["OMP_NUM_THREADS"] = "1"
    return env


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # a suite started from a background shell ignores it


def _recipe(tmp_path: Path, spec: dict, name: str) -> Path:
    import yaml

    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _run(cmd: list[str], tmp_path: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True, timeout=timeout,
                          preexec_fn=_default_sigint)


def _zoo(tmp_path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "zoo.cli.main", "--registry", str(tmp_path / "registry.db"), *args]


def _weights(registry, name: str) -> dict[str, torch.Tensor]:
    ck = open_checkpoint(registry.model_dir(name))
    return {n: ck.read_tensor(n).float() for n in ck.tensors}


def _leftovers(tmp_path: Path) -> list[str]:
    """Temp files and half-written folders the runs could leave beside the registry."""
    return sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".") or "writing" in p.name
                  or p.name.endswith(".tmp"))


def _same_as_one_process(registry, one: str, two: str) -> None:
    a, b = (registry.show(n)["recipe"]["learned"] for n in (one, two))
    torch.testing.assert_close(torch.tensor(b["coefficients"]), torch.tensor(a["coefficients"]), rtol=0,
                               atol=COEF_ATOL)
    assert b["final_loss"] == pytest.approx(a["final_loss"], rel=LOSS_RTOL)
    assert b["steps"] == a["steps"]
    wa, wb = _weights(registry, one), _weights(registry, two)
    assert wa.keys() == wb.keys()
    for n in wa:
        torch.testing.assert_close(wb[n], wa[n], rtol=0, atol=WEIGHT_ATOL)


def test_two_processes_under_torchrun_learn_adamerging_as_one(registry, tiny, tmp_path):
    merge.run(merge.from_dict(ADA), "one", registry=registry)
    done = _run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "-m", "zoo.cli.main",
                 "--registry", str(tmp_path / "registry.db"), "merge", str(_recipe(tmp_path, ADA, "ada")),
                 "--out", "two", "--device", "cpu"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("merged 3 model(s) with adamerging into two@1") == 1  # rank 0 alone speaks
    _same_as_one_process(registry, "one", "two")
    assert [m["name"] for m in registry.list() if m["name"] == "two"] == ["two"]  # registered once
    assert _leftovers(tmp_path) == []


def test_two_processes_with_nproc_level_parity_as_one(registry, tiny, tmp_path):
    merge.run(merge.from_dict(PARITY), "one", registry=registry)
    done = _run(_zoo(tmp_path, "merge", str(_recipe(tmp_path, PARITY, "parity")), "--out", "two", "--device", "cpu",
                     "--nproc", "2"), tmp_path)
    assert done.returncode == 0, done.stderr
    _same_as_one_process(registry, "one", "two")
    a, b = (registry.show(n)["recipe"]["learned"]["table"] for n in ("one", "two"))
    assert [(r["round"], r["task"], r["reliable"], r["parity"]) for r in b] == \
        [(r["round"], r["task"], r["reliable"], r["parity"]) for r in a]  # the same samples trained
    assert done.stdout.count("ROUND") == 1  # one table: rank 0's
    assert _leftovers(tmp_path) == []


def test_an_error_on_every_process_is_one_line(registry, tiny, tmp_path):
    spec = {**ADA, "parameters": {**ADA["parameters"], "batch_size": 1}}
    done = _run(_zoo(tmp_path, "merge", str(_recipe(tmp_path, spec, "bad")), "--out", "bad", "--device", "cpu",
                     "--nproc", "2"), tmp_path)
    assert done.returncode == 1
    assert done.stderr.splitlines() == ["error: a batch of 1 example(s) cannot be split across 2 processes; raise "
                                        "batch_size (and give each task at least 2 examples) or use fewer processes"]
    assert not registry.has("bad") and _leftovers(tmp_path) == []


def test_nproc_is_for_learned_methods(zoo_cli, registry, tiny):
    code, _, err = zoo_cli("--registry", str(registry.path), "merge", "--method", "task_arithmetic", "--base", "base",
                           "e0", "e1", "--out", "ta", "--nproc", "2")
    assert code == 1 and err.startswith("error: task_arithmetic merges tensor by tensor in one process")
    assert err.count("\n") == 1


def _start_long(tmp_path: Path, name: str) -> subprocess.Popen:
    spec = {**ADA, "parameters": {**ADA["parameters"], "steps": 100000}}
    return subprocess.Popen(_zoo(tmp_path, "merge", str(_recipe(tmp_path, spec, name)), "--out", name,
                                 "--device", "cpu", "--nproc", "2"), cwd=tmp_path, env=_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return sorted(int(x) for x in path.read_text().split()) if path.exists() else []


def _training(tmp_path: Path, parent: subprocess.Popen, timeout: float = 300) -> list[int]:
    """The two processes, once both have run a while (loading the model takes a few
    CPU-seconds each; what matters is that every moment ends the same way)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        kids = _children(parent.pid)
        if len(kids) == 2 and all(_cpu_seconds(k) > 6 for k in kids):
            return kids
        assert parent.poll() is None, parent.communicate()
        time.sleep(0.2)
    raise AssertionError("the processes did not start")


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _gone(pids: list[int]) -> bool:
    return all(not Path(f"/proc/{p}").exists() for p in pids)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ctrl_c_stops_every_process_with_one_line(registry, tiny, tmp_path):
    parent = _start_long(tmp_path, "stopped")
    kids = _training(tmp_path, parent)
    parent.send_signal(signal.SIGINT)
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 130
    assert err.splitlines() == ["error: interrupted; no half-finished change was saved"]
    time.sleep(0.5)
    assert _gone(kids) and not registry.has("stopped") and _leftovers(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_killed_process_stops_the_others_with_one_line(registry, tiny, tmp_path):
    parent = _start_long(tmp_path, "killed")
    kids = _training(tmp_path, parent)
    os.kill(kids[1], signal.SIGKILL)
    out, err = parent.communicate(timeout=120)
    assert parent.returncode == 1
    assert err.splitlines() == ["error: process 1 of 2 was killed (signal 9)"]
    time.sleep(0.5)
    assert _gone(kids) and not registry.has("killed") and _leftovers(tmp_path) == []
