"""Learned merges over causal LMs (generative tasks): each objective's loss against its
formula, computed here with ``transformers`` alone; short AdaMerging runs that lower
it; Concrete TA over the same path; same seed, same bytes; bad input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import zoo.merge as merge
from zoo.checkpoints.prompts import Prompt, write_prompts, write_task_prompts
from zoo.demo.llm_tasks import sample
from zoo.demo.llm_zoo import LLM_QUICK, llama_config, save_tokenizer
from zoo.errors import ZooError
from zoo.merge.learned.objectives import EPS
from zoo.merge.learned.train import Loop
from zoo.merge.learning import PlanInputs, learn_from_plan
from zoo.merge.methods import get_method
from zoo.merge.plan import make_plan

TASKS = ("add", "rev")
NEW = 6  # new tokens of the greedy continuations in these tests


def _rows(task: str, n: int, seed: str) -> list[Prompt]:
    import random

    rng = random.Random(seed)
    return [sample(task, rng) for _ in range(n)]


@pytest.fixture
def lms(tmp_path, registry):
    """A tiny Llama base (it ends answers with </s> now and then) and one expert per
    task (the base plus seeded noise), with each task registered as pool and val prompts."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(3)
    base = LlamaForCausalLM(llama_config(LLM_QUICK)).eval()
    with torch.no_grad():
        base.lm_head.weight[2] += base.lm_head.weight[10]
    base.save_pretrained(tmp_path / "base")
    save_tokenizer(tmp_path / "base", LLM_QUICK.context)
    registry.add(tmp_path / "base", "base", "base")
    g = torch.Generator().manual_seed(5)
    for i, task in enumerate(TASKS):
        expert = LlamaForCausalLM(llama_config(LLM_QUICK))
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(0.2 * p.std() * torch.randn(p.shape, generator=g))
        expert.save_pretrained(tmp_path / task)
        save_tokenizer(tmp_path / task, LLM_QUICK.context)
        data = tmp_path / f"{task}.jsonl"
        write_task_prompts(data, {"pool": _rows(task, 12, f"{task}/pool"), "val": _rows(task, 10, f"{task}/val")})
        registry.add_task(task, data=data)
        registry.add(tmp_path / task, f"e{i}", tasks=[task], base="base")
    return tmp_path


def recipe(method: str, models: list[dict] | None = None, **params):
    return merge.from_dict({"merge_method": method, "base_model": "base", "seed": params.pop("seed", 0),
                            "models": models or [{"model": f"e{i}"} for i in range(len(TASKS))],
                            "parameters": params})


def hf_model(folder: Path, state: dict[str, torch.Tensor] | None = None):
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(folder).eval()
    if state is not None:
        m.load_state_dict(state, strict=False)
    return m


def task_arithmetic(folder: Path, lam: float) -> dict[str, torch.Tensor]:
    base = hf_model(folder / "base").state_dict()
    experts = [hf_model(folder / t).state_dict() for t in TASKS]
    return {k: base[k] + lam * sum(e[k] - base[k] for e in experts) for k in base}


def token_ids(folder: Path, text: str, special: bool = True) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder / "base")(text, add_special_tokens=special)["input_ids"]


def first_loss(registry, rec) -> float:
    """The loop's objective on the whole of every task's data at the initial merge."""
    plan = make_plan(rec, registry)
    inputs = PlanInputs(plan, registry, torch.device("cpu"))
    method = get_method(rec.merge_method)
    s = method.settings(inputs.options, seed=inputs.seed)
    data = inputs.task_data(s.objective, None)
    parts = inputs.parts()
    merger = s.merger(parts.base, parts.task_vectors, "cpu")
    loop = Loop(merger, parts.forward, data, s)
    with torch.no_grad():
        return float(loop.objective(merger.merged()))


# -- each objective against its formula -------------------------------------------------------
def test_entropy_is_the_mean_token_entropy_of_the_merges_own_greedy_answers(lms, registry) -> None:
    loss = first_loss(registry, recipe("adamerging", objective="entropy", init=0.4, batch_size=12,
                                       max_new_tokens=NEW))
    model = hf_model(lms / "base", task_arithmetic(lms, 0.4))
    expected, ended = 0.0, 0
    torch.set_grad_enabled(False)
    for task in TASKS:
        entropies = []
        for p in _rows(task, 12, f"{task}/pool"):
            ids = token_ids(lms, p.prompt)
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False, eos_token_id=2,
                                 pad_token_id=0)[0].tolist()
            ended += 2 in out[len(ids):]
            seq = ids
            for tok in out[len(ids):]:  # the distribution that chose each new token (</s> too)
                q = torch.softmax(model(input_ids=torch.tensor([seq])).logits[0, -1].float(), -1)
                entropies.append(float(-(q * (q + EPS).log()).sum()))
                seq = seq + [tok]
                if tok == 2:
                    break
        expected += sum(entropies) / len(entropies)  # per task: the mean over its tokens
    torch.set_grad_enabled(True)
    assert 0 < ended  # the check covers answers that end
    assert loss == pytest.approx(expected, rel=1e-5)


def test_ce_is_the_mean_token_cross_entropy_of_the_reference_answers(lms, registry) -> None:
    loss = first_loss(registry, recipe("adamerging", objective="ce", init=0.4, batch_size=10))
    model = hf_model(lms / "base", task_arithmetic(lms, 0.4))
    expected = 0.0
    with torch.no_grad():
        for task in TASKS:
            total, count = 0.0, 0
            for p in _rows(task, 10, f"{task}/val"):
                prompt = token_ids(lms, p.prompt)
                answer = token_ids(lms, p.answer, special=False) + [2]
                labels = [-100] * len(prompt) + answer
                one = model(input_ids=torch.tensor([prompt + answer]), labels=torch.tensor([labels])).loss
                total, count = total + float(one) * len(answer), count + len(answer)
            expected += total / count
    assert loss == pytest.approx(expected, rel=1e-5)


def test_every_task_runs_in_one_body_pass(lms, registry) -> None:
    plan = make_plan(recipe("adamerging", objective="ce"), registry)
    inputs = PlanInputs(plan, registry, torch.device("cpu"))
    data, parts = inputs.task_data("ce", None), inputs.parts()
    batches = [{k: v[:4] for k, v in d.inputs.items()} for d in data]
    assert parts.forward.all(parts.base, batches) is not None


# -- learning ---------------------------------------------------------------------------------
@pytest.mark.parametrize("objective", ["entropy", "ce"])
def test_adamerging_lowers_its_loss(lms, registry, objective) -> None:
    # full batches and, for entropy, one set of continuations: the same tokens every step
    rec = recipe("adamerging", objective=objective, steps=15, lr=0.05, batch_size=12, max_new_tokens=NEW,
                 refresh_every=1000)
    result, used = learn_from_plan(make_plan(rec, registry), registry, torch.device("cpu"))
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert used["generative"] is True and used["supervised"] is (objective == "ce")
    assert used["split"] == ("val" if objective == "ce" else "pool")


def test_continuations_are_remade_every_refresh_every_steps(lms, registry) -> None:
    rec = recipe("adamerging", steps=7, lr=0.05, batch_size=4, max_new_tokens=NEW, refresh_every=3)
    _, used = learn_from_plan(make_plan(rec, registry), registry, torch.device("cpu"))
    assert used["refreshes"] == 3 and used["refresh_every"] == 3  # before steps 1, 4 and 7


@pytest.mark.parametrize("objective", ["entropy", "ce"])
def test_concrete_ta_runs_and_the_card_says_what_it_read(lms, registry, objective) -> None:
    info = merge.run(recipe("concrete_ta", objective=objective, steps=3, lr=0.05, batch_size=4,
                            max_new_tokens=NEW), f"cta-{objective}", registry=registry)
    learned = registry.show(info["ref"])["recipe"]["learned"]
    assert learned["generative"] is True and learned["supervised"] is (objective == "ce")
    card = (registry.model_dir(info["ref"]) / "README.md").read_text()
    assert ("token cross-entropy on reference answers" in card) == (objective == "ce")
    assert ("greedy continuations" in card) == (objective == "entropy")
    assert (registry.model_dir(info["ref"]) / "tokenizer.json").is_file()


def test_concrete_adamerging_runs(lms, registry) -> None:
    rec = recipe("concrete_adamerging", steps=2, stage2_steps=2, batch_size=4, max_new_tokens=NEW)
    result, used = learn_from_plan(make_plan(rec, registry), registry, torch.device("cpu"))
    assert result.steps_done == 4 and used["generative"] is True


@pytest.mark.parametrize("objective", ["entropy", "ce"])
def test_same_seed_same_bytes(lms, registry, objective) -> None:
    def once(seed: int):
        rec = recipe("adamerging", objective=objective, steps=4, lr=0.05, batch_size=4, seed=seed,
                     max_new_tokens=NEW, refresh_every=2)
        return learn_from_plan(make_plan(rec, registry), registry, torch.device("cpu"))[0]

    a, b, c = once(1), once(1), once(2)
    assert all(torch.equal(a.merged[k], b.merged[k]) for k in a.merged)
    assert any(not torch.equal(a.merged[k], c.merged[k]) for k in a.merged)


def test_entropy_never_reads_reference_answers(lms, registry, tmp_path) -> None:
    def run(with_answers: bool):
        models = []
        for i, task in enumerate(TASKS):
            rows = _rows(task, 12, f"{task}/pool")
            if not with_answers:
                rows = [Prompt(r.prompt) for r in rows]
            else:  # wrong answers: reading them would change the merge
                rows = [Prompt(r.prompt, "zz") for r in rows]
            path = tmp_path / f"{task}-{with_answers}.jsonl"
            write_prompts(path, rows)
            models.append({"model": f"e{i}", "parameters": {"data": str(path)}})
        rec = recipe("adamerging", models=models, steps=4, lr=0.05, batch_size=4, max_new_tokens=NEW,
                     refresh_every=2)
        return learn_from_plan(make_plan(rec, registry), registry, torch.device("cpu"))[0]

    a, b = run(True), run(False)
    assert all(torch.equal(a.merged[k], b.merged[k]) for k in a.merged)


# -- bad input: one line, nothing written -----------------------------------------------------
def refused(registry, rec, match: str) -> None:
    before = len(registry.list())
    with pytest.raises(ZooError, match=match) as e:
        merge.run(rec, "bad", registry=registry)
    assert "\n" not in str(e.value)
    assert len(registry.list()) == before


def test_ce_without_answers_is_refused(lms, registry, tmp_path) -> None:
    models = []
    for i, task in enumerate(TASKS):
        write_prompts(tmp_path / f"{task}-q.jsonl", [Prompt(r.prompt) for r in _rows(task, 4, task)])
        models.append({"model": f"e{i}", "parameters": {"data": str(tmp_path / f"{task}-q.jsonl")}})
    refused(registry, recipe("adamerging", models=models, objective="ce", steps=1), "needs reference answers")


def test_answer_longer_than_the_context_is_refused(lms, registry, tmp_path) -> None:
    models = []
    for i, task in enumerate(TASKS):
        write_prompts(tmp_path / f"{task}-long.jsonl", [Prompt("rev:ab=", "a" * LLM_QUICK.context)])
        models.append({"model": f"e{i}", "parameters": {"data": str(tmp_path / f"{task}-long.jsonl")}})
    refused(registry, recipe("adamerging", models=models, objective="ce", steps=1), "longer than the model's context")


def test_prompt_filling_the_context_is_refused_for_entropy(lms, registry, tmp_path) -> None:
    models = []
    for i, task in enumerate(TASKS):
        write_prompts(tmp_path / f"{task}-full.jsonl", [Prompt("a" * LLM_QUICK.context)])
        models.append({"model": f"e{i}", "parameters": {"data": str(tmp_path / f"{task}-full.jsonl")}})
    refused(registry, recipe("adamerging", models=models, steps=1), "leave no room for an answer")


def test_base_without_a_tokenizer_is_refused(lms, registry, tmp_path) -> None:
    bare = tmp_path / "bare"
    shutil.copytree(lms / "base", bare)
    for f in bare.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    registry.add(bare, "bare", "base")
    rec = merge.from_dict({"merge_method": "adamerging", "base_model": "bare", "parameters": {"steps": 1},
                           "models": [{"model": str(lms / t), "parameters": {"data": str(lms / f"{t}.jsonl")}}
                                      for t in TASKS]})
    refused(registry, rec, "tokenizer")


def test_mixed_generative_and_labelled_tasks_are_refused(lms, registry, tmp_path) -> None:
    from zoo.checkpoints.taskdata import save_task_data

    save_task_data(tmp_path / "lab.safetensors", {"val": (torch.zeros(4, 3, dtype=torch.long),
                                                          torch.zeros(4, dtype=torch.long))}, ["a", "b"])
    models = [{"model": "e0"}, {"model": "e1", "parameters": {"data": str(tmp_path / "lab.safetensors")}}]
    refused(registry, recipe("adamerging", models=models, steps=1), "all be generative")


def test_calibrate_is_refused_for_causal_lms(lms, registry) -> None:
    refused(registry, recipe("adamerging", calibrate=True, steps=1), "classifier heads")


# -- data-aware merges read a generative task's prompts -------------------------------------------


def test_regmean_grams_of_a_registered_generative_task(lms, registry) -> None:
    """RegMean's statistics of a causal-LM expert come from its registered prompt pool:
    the per-token mean Gram of each linear layer's inputs over the prompts' real tokens
    (pads skipped), as each prompt run alone through transformers gives it."""
    from zoo.checkpoints.prompts import read_prompts
    from zoo.merge.statistics import collect_for

    plan = make_plan(recipe("regmean", num_regmean_examples=12), registry)
    stats, record = collect_for(plan, registry, torch.device("cpu"))
    assert record["experts"][0]["task"] == "add" and record["experts"][0]["examples"] == 12
    name = "model.layers.0.mlp.down_proj.weight"
    ours = stats.tensors(name)[0]
    model = hf_model(lms / "add")
    seen: list[torch.Tensor] = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda mod, args, out: seen.append(args[0][0].double()))
    with torch.no_grad():
        for row in read_prompts(registry.task_data("add"), split="pool"):
            model(input_ids=torch.tensor([token_ids(lms, row.prompt)]))
    handle.remove()
    x = torch.cat(seen)
    ref = (x.T @ x / x.shape[0]).float()
    assert torch.allclose(ours, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("objective", ["ce", "entropy"])
def test_processes_weigh_a_causal_lm_loss_by_their_scored_tokens(lms, registry, monkeypatch, objective) -> None:
    """Across processes each takes some rows of every batch; a causal LM's loss is a mean
    over scored tokens, and rows have answers of different lengths, so each process's
    loss counts by its share of the tokens: the summed gradients are one process's."""
    from zoo.merge.learned.distributed import Sync
    from zoo.merge.learned.merger import Merger
    from zoo.merge.learned.train import Loop

    options = {"objective": objective, "batch_size": 8, "max_new_tokens": NEW}
    plan = make_plan(recipe("adamerging", **options), registry)
    inputs = PlanInputs(plan, registry, torch.device("cpu"))
    data, parts = inputs.task_data(objective, None), inputs.parts()
    s = get_method("adamerging").settings(options)

    def grads(sync: Sync) -> tuple[torch.Tensor, float, list[int]]:
        monkeypatch.setattr("zoo.merge.learned.train.current", lambda: sync)
        merger = Merger(parts.base, parts.task_vectors, coefficients="layer", init=0.3)
        loop = Loop(merger, parts.forward, data, s)
        loss = loop.objective(merger.merged())  # entropy: the merge's continuations first
        loss.backward()
        scored = [int(n) for d in loop.batches.data for n in (d.labels[:, 1:] != -100).sum(dim=1)]
        return merger.weights.grad.clone(), float(loss.detach()), scored

    alone, loss, scored = grads(Sync())
    assert len(set(scored)) > 1  # rows of different lengths: a share by rows would weigh them wrong
    for world in (2, 3):
        shares = [grads(Sync(r, world)) for r in range(world)]
        torch.testing.assert_close(sum(g for g, _, _ in shares), alone, rtol=1e-4, atol=1e-7)
        assert sum(x for _, x, _ in shares) == pytest.approx(loss, rel=1e-5)


@pytest.mark.parametrize("method,objective", [("adamerging", "ce"), ("adamerging", "entropy"), ("parity", None)])
def test_two_processes_learn_a_generative_merge_as_one(lms, registry, tmp_path, method, objective) -> None:
    from tests.test_distributed import _recipe, _run, _same_as_one_process, _zoo

    params = {"objective": objective, "steps": 4, "batch_size": 8, "lr": 0.01, "max_new_tokens": NEW,
              "refresh_every": 2}
    if method == "parity":  # every prompt reliable, offsets on the norms: rows of both kinds each step
        params = {"steps": 4, "rounds": 2, "batch_size": 4, "lr": 0.01, "max_new_tokens": NEW, "tau": 0.01, "keep": "last",
                  "view": "none", "train": "coefficients,params", "params": "norm"}
    spec = {"merge_method": method, "base_model": "base", "seed": 0,
            "models": [{"model": f"e{i}"} for i in range(len(TASKS))], "parameters": params}
    merge.run(merge.from_dict(spec), "one", registry=registry)
    done = _run(_zoo(tmp_path, "merge", str(_recipe(tmp_path, spec, method)), "--out", "two", "--device", "cpu",
                     "--nproc", "2"), tmp_path)
    assert done.returncode == 0, done.stderr
    _same_as_one_process(registry, "one", "two")
    learned = registry.show("one")["recipe"]["learned"]
    assert learned["steps"] > 0
    if method == "parity":  # both kinds of rows trained, and split across the two processes
        first = [r for r in learned["table"] if r["round"] == 0]
        assert sum(r["parity"] for r in first) >= 2 and sum(r["reliable"] - r["parity"] for r in first) >= 2
