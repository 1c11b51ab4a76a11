"""Parity distillation for generative experts (causal LMs): the parity-set rule's four
cases on generated answers, the loss against its formula, the cached teacher
distributions, a tiny run whose disagreement falls, a MergeLock-protected teacher,
determinism, and bad input. On a tiny seeded Llama zoo (``zoo.demo.llm_zoo``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zoo.merge as merge
from zoo import open_checkpoint
from zoo.checkpoints.prompts import Prompt, read_prompts, write_task_prompts
from zoo.demo.llm_zoo import LLM_QUICK, llm_zoo
from zoo.errors import ZooError
from zoo.merge.learned.generative_parity import annotate, generative_loss, generative_rule
from zoo.merge.methods import get_method
from zoo.textgen import TextCodec, generate, scored, teacher_forced

# trained a little longer than LLM_QUICK, so the experts answer differently from their merge
CFG = dataclasses.replace(LLM_QUICK, base_steps=200, expert_steps=60)
TASKS = list(CFG.tasks)


@pytest.fixture(scope="module")
def llm(tmp_path_factory) -> Path:
    folder, _ = llm_zoo(CFG, cache=tmp_path_factory.mktemp("llm-cache"), log=lambda _: None)
    return folder


@pytest.fixture
def zoo_reg(llm, registry, tmp_path):
    """The tiny zoo registered: base, one expert per task, each task's prompt splits."""
    registry.add(llm / "base", "base", "base")
    for t in TASKS:
        rows = {s: read_prompts(llm / "tasks" / t / f"{s}.jsonl") for s in ("pool", "val", "test")}
        write_task_prompts(tmp_path / f"{t}.jsonl", rows)
        registry.add_task(t, data=tmp_path / f"{t}.jsonl")
        registry.add(llm / "experts" / t, t, "expert", base="base", tasks=[t])
    return registry


def recipe(models=None, **params):
    params = {"tau": 0.1, "view": "none", "rounds": 2, "steps": 10, "lr": 0.05, "max_new_tokens": 12, **params}
    return merge.from_dict({"merge_method": "parity", "base_model": "base", "seed": params.pop("seed", 0),
                            "models": models or [{"model": t} for t in TASKS], "parameters": params})


def settings(**options):
    return get_method("parity").settings(options)


def weights(registry, name):
    ck = open_checkpoint(registry.model_dir(name))
    return {n: ck.read_tensor(n) for n in ck.tensors}


def mean(rows, key):
    return sum(r[key] for r in rows) / len(rows)


def lm_of(folder: Path):
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(folder).eval()
    return model, lambda b: model(input_ids=b["input_ids"], attention_mask=b.get("attention_mask")).logits


# -- the rule and the loss ----------------------------------------------------------------------
def test_parity_rule_on_all_four_cases_of_generated_answers(llm):
    """The expert's generated answers, reliable or not, against a merge that agrees or not."""
    _, teacher = lm_of(llm / "experts" / "rev")
    codec = TextCodec.from_folder(llm / "base", context=CFG.context)
    prompts = [codec.prompt_ids(Prompt(p)) for p in ("rev:abc=", "rev:hello=", "up:dog=", "add:12+34=")]
    s = settings(view="sample", tau=0.5)
    a = annotate(teacher, prompts, codec, s, torch.Generator().manual_seed(0), "cpu", False)
    greedy = generate(teacher, prompts, codec.eos_id, s.max_new_tokens)
    assert a.texts == [codec.decode(g.tokens) for g in greedy]
    assert a.confidence.tolist() == pytest.approx([g.confidence for g in greedy])
    # sample 0 reliable+disagree, 1 reliable+agree, 2 unreliable (confidence)+disagree,
    # 3 unreliable (confidence)+agree, 4 unreliable (the sampled view differs)+disagree,
    # 5 unreliable (the answer never ended)+agree
    answers = [a.texts[0], a.texts[1], "x", "y", "z", "w"]
    view = [answers[0], " " + answers[1] + " ", "x", "y", "other", "w"]  # white space does not count
    confidence = torch.tensor([0.95, 0.99, 0.3, 0.4, 0.97, 0.99])
    ended = torch.tensor([True, True, True, True, True, False])
    student = [answers[0] + "!", answers[1], "not x", "y", "not z", "w"]
    sel = generative_rule(confidence, ended, answers, view, student, tau=0.9)
    assert sel.reliable.tolist() == [True, True, False, False, False, False]
    assert sel.agree.tolist() == [False, True, False, True, False, True]
    assert sel.parity.tolist() == [True, False, False, False, False, False]
    assert sel.agreeing.tolist() == [False, True, False, False, False, False]
    # without a second view, confidence and an ended answer decide
    assert generative_rule(confidence, ended, answers, None, student, 0.9).parity.tolist() == \
        [True, False, False, False, True, False]
    # the expert as the merge: it agrees with itself everywhere, no parity set
    same = generative_rule(a.confidence, a.ended, a.texts, a.view_texts, a.texts, 0.0)
    assert sel.parity.any() and not same.parity.any() and same.agree.all()


def test_loss_is_token_ce_plus_scaled_kl_plus_agreeing_kl():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(9, 7, generator=g), torch.randn(9, 7, generator=g).log_softmax(-1)
    target = torch.randint(0, 7, (9,), generator=g)
    rows = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3])  # rows 0, 1 are parity prompts; 2, 3 agreeing
    s = settings(kl_weight=0.5, kl_temperature=2.0, agree_weight=0.1)

    def kl(p_logits, q_logits):  # KL(p ‖ q), mean over positions
        p = p_logits.softmax(-1)
        return (p * (p_logits.log_softmax(-1) - q_logits.log_softmax(-1))).sum(-1).mean()

    par, agr = slice(0, 5), slice(5, 9)
    expect = (F.cross_entropy(student[par], target[par]) + 0.5 * 4 * kl(teacher[par] / 2, student[par] / 2)
              + 0.1 * kl(teacher[agr], student[agr]))
    torch.testing.assert_close(generative_loss(student, target, rows, 2, teacher, s), expect)
    plain = settings(kl_weight=0.0, agree_weight=0.0)
    torch.testing.assert_close(generative_loss(student, target, rows, 2, None, plain),
                               F.cross_entropy(student[par], target[par]))


def test_teacher_distributions_are_the_teachers_own_on_its_answers(llm):
    model, teacher = lm_of(llm / "experts" / "upper")
    codec = TextCodec.from_folder(llm / "base", context=CFG.context)
    prompts = [codec.prompt_ids(Prompt(p)) for p in ("up:abc=", "up:hello=", "up:q=")]
    a = annotate(teacher, prompts, codec, settings(view="none"), torch.Generator(), "cpu", True)
    assert a.view_texts is None
    for p, ans, dist in zip(prompts, a.answers, a.teacher):
        batch = teacher_forced([p], [list(ans) + [codec.eos_id]], codec.pad_id)
        with torch.no_grad():
            logits, target, _ = scored(model(input_ids=batch["input_ids"]).logits, batch["labels"])
        assert dist.shape == (len(ans) + 1, logits.shape[-1])
        torch.testing.assert_close(dist, logits.log_softmax(-1), rtol=1e-4, atol=1e-5)


# -- through the registry --------------------------------------------------------------------------
def test_disagreement_falls_and_the_lineage_and_metrics_say_so(zoo_reg):
    info = merge.run(recipe(train="params", params=".", rounds=3, steps=60, lr=0.001), "p", registry=zoo_reg)
    rows = info["parity"]
    start, end = [r for r in rows if r["round"] == 0], [r for r in rows if r["kept"]]
    assert mean(start, "disagreement") > 0.2
    # these tiny experts are unsure (mean token confidence 0.2-0.5), so rounds overshoot
    assert mean(end, "disagreement") < 0.6 * mean(start, "disagreement")
    by_round = {r: mean([x for x in rows if x["round"] == r], "disagreement") for r in range(4)}
    assert end[0]["round"] == min(by_round, key=by_round.get)  # keep: best, label-free
    assert all(r["pool"] == CFG.pool_size for r in rows)
    shown = zoo_reg.show("p")
    learned = shown["recipe"]["learned"]
    assert learned["objective"] == "parity" and learned["generative"] and learned["supervised"] is False
    assert learned["teachers"] == [f"{t}@1" for t in TASKS] and learned["split"] == "pool"
    assert learned["tasks"] == TASKS and len(learned["teacher_answers"]) == len(TASKS)
    assert learned["table"] == rows and learned["offset_tensors"]
    metrics = {(m["task"], m["metric"]): m for m in shown["metrics"]}
    for r in end:
        assert metrics[r["task"], "parity_set"]["value"] == r["parity"]
        assert metrics[r["task"], "disagreement"]["value"] == pytest.approx(r["disagreement"])
        assert metrics[r["task"], "exact_match"]["split"] == "test"
    # the saved checkpoint is plain, and answers as the table's last measurement says
    codec = TextCodec.from_folder(zoo_reg.model_dir("p"), context=CFG.context)
    _, fn = lm_of(zoo_reg.model_dir("p"))
    for r in end:
        test = read_prompts(zoo_reg.task_data(r["task"]), split="test")
        got = [codec.decode(g.tokens) for g in generate(fn, [codec.prompt_ids(p) for p in test], codec.eos_id, 12,
                                                          context=CFG.context)]
        assert sum(a == p.answer for a, p in zip(got, test)) / len(test) == pytest.approx(r["exact_match"])


def test_same_seed_same_bytes_other_seed_other_bytes(zoo_reg):
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        merge.run(recipe(seed=seed, batch_size=4, rounds=1, steps=5, keep="last"), name, registry=zoo_reg)
    a, b, c = (weights(zoo_reg, n) for n in "abc")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)


def test_a_protected_teacher_teaches_as_the_original(zoo_reg):
    """MergeLock keeps the function: the protected expert's answers (greedy and sampled),
    reliability and parity sets are the original's, and with the answer-token loss alone
    the merge is the same bytes (the KL terms see distributions that differ by float
    rounding)."""
    from zoo.protect.run import protect

    protect("upper", "upper-locked", registry=zoo_reg, seed=3)
    codec = TextCodec.from_folder(zoo_reg.model_dir("base"), context=CFG.context)
    prompts = [codec.prompt_ids(p) for p in read_prompts(zoo_reg.task_data("upper"), split="pool")]
    seen = []
    for name in ("upper", "upper-locked"):
        _, fn = lm_of(zoo_reg.model_dir(name))
        seen.append(annotate(fn, prompts, codec, settings(view="sample", max_new_tokens=12),
                             torch.Generator().manual_seed(0), "cpu", True))
    assert seen[0].texts == seen[1].texts and seen[0].view_texts == seen[1].view_texts
    torch.testing.assert_close(seen[1].confidence, seen[0].confidence, rtol=1e-4, atol=1e-5)
    models = [{"model": "add"}, {"model": "rev"}, {"model": "upper", "parameters": {"teacher": "upper-locked"}}]
    for loss in ({"agree_weight": 0.0}, {"agree_weight": 0.1, "kl_weight": 0.5}):
        tag = "hard" if loss["agree_weight"] == 0 else "kl"
        opts = {"rounds": 2, "steps": 8, **loss}
        plain = merge.run(recipe(**opts), f"{tag}-plain", registry=zoo_reg)
        locked = merge.run(recipe(models=models, **opts), f"{tag}-locked", registry=zoo_reg)
        assert [(r["reliable"], r["parity"]) for r in locked["parity"]] == \
            [(r["reliable"], r["parity"]) for r in plain["parity"]]
        assert sum(r["parity"] for r in plain["parity"] if r["task"] == "upper") > 0
        learned = [zoo_reg.show(n)["recipe"]["learned"] for n in (f"{tag}-plain", f"{tag}-locked")]
        assert learned[0]["teacher_answers"] == learned[1]["teacher_answers"]
        a, b = weights(zoo_reg, f"{tag}-plain"), weights(zoo_reg, f"{tag}-locked")
        if tag == "hard":
            assert all(torch.equal(a[n], b[n]) for n in a)
        else:
            for n in a:
                torch.testing.assert_close(b[n], a[n], rtol=1e-3, atol=1e-4)
    assert zoo_reg.show("hard-locked")["recipe"]["learned"]["teachers"] == ["add@1", "rev@1", "upper-locked@1"]


def test_a_view_for_images_is_refused_on_prompts(zoo_reg):
    with pytest.raises(ZooError, match="view shift does not apply to generated answers"):
        merge.run(recipe(view="shift"), "p", registry=zoo_reg)
    assert not zoo_reg.has("p")


def test_zoo_merge_prints_the_rounds_exact_match(zoo_reg, zoo_cli, tmp_path):
    """The CLI's parity table gives generative tasks an exact-match column (the task's
    answered split), and every cell is the number the lineage records."""
    import yaml

    spec = {"merge_method": "parity", "base_model": "base", "models": [{"model": t} for t in TASKS],
            "parameters": {"tau": 0.1, "view": "none", "rounds": 1, "steps": 5, "lr": 0.05, "max_new_tokens": 12}}
    (tmp_path / "p.yml").write_text(yaml.safe_dump(spec))
    code, out, err = zoo_cli("--registry", zoo_reg.path, "merge", tmp_path / "p.yml", "--out", "cli-p")
    assert code == 0, err
    header, *lines = out.splitlines()
    assert header.split()[-3:] == ["EXACT", "MATCH", "%"] and "ACCURACY" not in header
    printed = {}
    for ln in lines[:-1]:  # the last line says what was merged
        cells = ln.split()
        kept = cells[1] == "kept"
        rnd, (task, pool, reliable, parity, dis, em) = int(cells[0]), cells[2 if kept else 1:]
        printed[rnd, task] = (kept, int(pool), int(reliable), int(parity), float(dis), float(em))
    table = zoo_reg.show("cli-p")["recipe"]["learned"]["table"]
    for r in range(2):
        rows = [x for x in table if x["round"] == r]
        rows.append({"task": "avg", "kept": rows[0]["kept"], "pool": sum(x["pool"] for x in rows),
                     "reliable": sum(x["reliable"] for x in rows), "parity": sum(x["parity"] for x in rows),
                     "disagreement": mean(rows, "disagreement"), "exact_match": mean(rows, "exact_match")})
        for x in rows:
            kept, pool, reliable, parity, dis, em = printed.pop((r, x["task"]))
            assert (kept, pool, reliable, parity) == (x["kept"], x["pool"], x["reliable"], x["parity"])
            assert dis == pytest.approx(100 * x["disagreement"], abs=0.051)
            assert em == pytest.approx(100 * x["exact_match"], abs=0.051)
    assert not printed


def test_a_second_run_reads_the_experts_answers_back_and_gives_the_same_bytes(zoo_reg, monkeypatch):
    """Each expert's decodes of its pool are kept as its lineage artifact: the same recipe
    again decodes nothing for the experts (two decodes fewer per task: greedy and the
    sampled view), restores the sampler's state, and writes the same bytes. Other decode
    settings decode anew."""
    import zoo.merge.learned.generative_parity as gp
    from zoo.merge.teacher_answers import Expect, RegistryDecodes

    calls = []
    real = gp.generate
    monkeypatch.setattr(gp, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    counts, learned = [], {}
    for name, extra in (("a", {}), ("b", {}), ("c", {"max_new_tokens": 10})):
        calls.clear()
        merge.run(recipe(view="sample", rounds=1, steps=5, **extra), name, registry=zoo_reg)
        counts.append(len(calls))
        learned[name] = zoo_reg.show(name)["recipe"]["learned"]
    assert learned["a"]["teacher_answers_reused"] == [False] * len(TASKS)
    assert learned["b"]["teacher_answers_reused"] == [True] * len(TASKS)
    assert learned["c"]["teacher_answers_reused"] == [False] * len(TASKS)
    assert counts[0] - counts[1] == 2 * len(TASKS) and counts[2] == counts[0]
    keys = learned["a"]["teacher_answer_artifacts"]
    assert keys == learned["b"]["teacher_answer_artifacts"] and all(keys)
    assert not set(keys) & set(learned["c"]["teacher_answer_artifacts"])
    assert learned["a"]["teacher_answers"] == learned["b"]["teacher_answers"]
    for t, key in zip(TASKS, keys):  # kept on the expert that answered
        assert zoo_reg.artifact(f"{t}@1", key).is_file()
    a, b = weights(zoo_reg, "a"), weights(zoo_reg, "b")
    assert all(torch.equal(a[n], b[n]) for n in a)
    # a kept set that does not fit the run is logged and decoded anew, never misread
    monkeypatch.setattr("zoo.merge.teacher_answers.artifact_key", lambda *_: keys[0])
    said = []
    cache = RegistryDecodes(zoo_reg, [f"{TASKS[0]}@1"], "base@1", Expect([CFG.pool_size + 1], 12, True, None),
                            said.append)
    assert cache.get(0, "any") is None and cache.keys == [None]
    assert len(said) == 1 and f"{keys[0]}" in said[0] and "does not hold" in said[0] and "decoding" in said[0]


def _kept(path, **tensors):
    from safetensors.torch import save_file

    from zoo.merge.teacher_answers import FORMAT

    meta = tensors.pop("meta", {"format": FORMAT})
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize("change,why", [
    ({"meta": {"format": "other"}}, "not zoo's teacher answers"),
    ({"greedy.lengths": None}, "no 'greedy.lengths'"),
    ({"greedy.lengths": torch.tensor([1.0, 1.0, 0.0])}, "torch.float32"),
    ({"greedy.tokens": torch.tensor([[5, 6]])}, "2 dimensions"),
    ({"greedy.lengths": torch.tensor([1, 1, 1])}, "does not hold 3 answers"),
    ({"greedy.lengths": torch.tensor([2, 0, 0])}, "longer than max_new_tokens"),
    ({"greedy.tokens": torch.tensor([5, 99])}, "outside the vocabulary"),
    ({"greedy.tokens": torch.tensor([-1, 6])}, "outside the vocabulary"),
    ({"confidence": torch.tensor([0.5, 2.0, 0.1])}, "not a probability"),
    ({"ended": torch.tensor([1, 0], dtype=torch.uint8)}, "not 3 values"),
    ({"view.tokens": None, "view.lengths": None}, "no 'view.tokens'"),
    ({"state": torch.zeros(7, dtype=torch.uint8)}, "not a torch generator's"),
    ({"state": None}, "no 'state'"),
])
def test_a_kept_set_that_does_not_fit_is_unusable(tmp_path, change, why):
    """Every tensor of a kept set is checked before it is used (a hostile or damaged
    file), each misfit said in one line."""
    from zoo.merge.teacher_answers import Expect, Unusable, read_decodes

    good = {"greedy.tokens": torch.tensor([5, 6]), "greedy.lengths": torch.tensor([1, 1, 0]),
            "ended": torch.tensor([1, 1, 0], dtype=torch.uint8), "confidence": torch.tensor([0.9, 0.5, 0.1]),
            "view.tokens": torch.tensor([5]), "view.lengths": torch.tensor([1, 0, 0]),
            "state": torch.Generator().get_state()}
    expect = Expect([3], 1, True, 50)
    kept = read_decodes(_kept(tmp_path / "good.safetensors", **good), 3, expect)
    assert kept.greedy == [(5,), (6,), ()] and kept.view == [(5,), (), ()] and kept.ended.tolist() == [True, True, False]
    bad = {k: v for k, v in {**good, **change}.items() if v is not None}
    with pytest.raises(Unusable, match=why):
        read_decodes(_kept(tmp_path / "bad.safetensors", **bad), 3, expect)
