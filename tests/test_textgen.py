"""zoo.textgen against transformers: greedy decoding equals ``model.generate``, the answer
log-likelihood equals the model's own loss, and prompts and answers encode as the
tokenizer does (plain and chat)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from zoo.checkpoints.prompts import Prompt, read_prompts, write_task_prompts, prompt_splits
from zoo.demo.llm_zoo import LLM_QUICK, llama_config, save_tokenizer
from zoo.errors import PromptDataError, ZooError
from zoo.textgen import IGNORE, TextCodec, answer_loglik, generate, same_answer, scored, teacher_forced


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("lm")
    torch.manual_seed(3)
    model = LlamaForCausalLM(llama_config(LLM_QUICK)).eval()
    with torch.no_grad():  # a random model barely ever says </s>; make it say it sometimes
        model.lm_head.weight[2] += 0.15 * model.lm_head.weight[10]
    model.save_pretrained(folder)
    save_tokenizer(folder, LLM_QUICK.context)
    return model, TextCodec.from_folder(folder, context=LLM_QUICK.context), folder


def logits_of(model):
    return lambda batch: model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def test_greedy_equals_transformers_generate(lm) -> None:
    model, codec, _ = lm
    prompts = [Prompt(p) for p in ("add:12+34=", "rev:abc=", "srt:hello=", "up:q=", "rev:abd=", "cnt:aab=")]
    ids = [codec.prompt_ids(p) for p in prompts]
    ours = generate(logits_of(model), ids, codec.eos_id, 8, batch_size=2)
    ended = 0
    for p, g in zip(ids, ours):
        ref = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, eos_token_id=codec.eos_id,
                             pad_token_id=codec.pad_id)[0, len(p):].tolist()
        ended += codec.eos_id in ref
        assert g.ended == (codec.eos_id in ref)
        ref = ref[:ref.index(codec.eos_id)] if codec.eos_id in ref else ref
        assert list(g.tokens) == ref
        assert 0.0 < g.confidence <= 1.0
    assert 0 < ended  # the comparison covers an answer that ends


def test_confidence_is_mean_probability_of_chosen_tokens(lm) -> None:
    model, codec, _ = lm
    ids = codec.prompt_ids(Prompt("rev:abc="))
    g = generate(logits_of(model), [ids], codec.eos_id, 5)[0]
    seq, probs = list(ids), []
    torch.set_grad_enabled(False)
    for t in list(g.tokens) + ([codec.eos_id] if g.ended else []):
        p = torch.softmax(model(input_ids=torch.tensor([seq])).logits[0, -1].float(), -1)
        probs.append(float(p[t]))
        seq.append(t)
    torch.set_grad_enabled(True)
    assert g.confidence == pytest.approx(sum(probs) / len(probs), rel=1e-5)


def test_sampling_is_seeded(lm) -> None:
    model, codec, _ = lm
    ids = [codec.prompt_ids(Prompt(p)) for p in ("rev:abc=", "srt:cab=")]

    def run(seed: int):
        return generate(logits_of(model), ids, codec.eos_id, 6, temperature=1.0,
                        generator=torch.Generator().manual_seed(seed))
    assert run(1) == run(1)
    assert any(run(1) != run(s) for s in range(2, 6))


def test_answer_loglik_equals_model_loss(lm) -> None:
    model, codec, _ = lm
    rows = [Prompt("add:12+34=", "46"), Prompt("rev:hello=", "olleh"), Prompt("up:q=", "Q")]
    batch = teacher_forced([codec.prompt_ids(r) for r in rows], [codec.answer_ids(r.answer) for r in rows],
                           codec.pad_id)
    total, count = answer_loglik(logits_of(model), batch)
    assert count.tolist() == [3, 6, 2]  # the answer's characters and </s>
    for i, r in enumerate(rows):  # each row alone, unpadded: transformers' mean token loss
        one = teacher_forced([codec.prompt_ids(r)], [codec.answer_ids(r.answer)], codec.pad_id)
        loss = model(**one).loss
        assert float(-total[i] / count[i]) == pytest.approx(float(loss), rel=1e-5)


def test_teacher_forced_layout() -> None:
    b = teacher_forced([[1, 5, 6], [1, 7]], [[8, 2], [9, 9, 2]], pad_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 6, 8, 2], [1, 7, 9, 9, 2]]
    assert b["labels"].tolist() == [[IGNORE] * 3 + [8, 2], [IGNORE] * 2 + [9, 9, 2]]
    b = teacher_forced([[1, 5]], [[2]], pad_id=0, length=4)
    assert b["input_ids"].tolist() == [[1, 5, 2, 0]] and b["attention_mask"].tolist() == [[1, 1, 1, 0]]
    logits = torch.arange(4 * 3, dtype=torch.float).reshape(1, 4, 3)
    sel, target, rows = scored(logits, b["labels"])
    assert target.tolist() == [2] and rows.tolist() == [0] and sel.tolist() == [logits[0, 1].tolist()]


def test_codec_matches_tokenizer(lm) -> None:
    _, codec, folder = lm
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder))
    assert codec.prompt_ids(Prompt("rev:abc=")) == tok("rev:abc=")["input_ids"]
    assert codec.answer_ids("cba") == tok("cba", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert codec.decode(codec.answer_ids("cba")) == "cba"
    assert codec.lengths(Prompt("rev:abc=", "cba")) == (9, 4)


def test_chat_prompts_use_the_chat_template(lm, tmp_path: Path) -> None:
    _, codec, folder = lm
    chat = Prompt("", "cba", (("user", "rev:abc="),))
    with pytest.raises(PromptDataError, match="chat template"):
        codec.prompt_ids(chat)
    codec.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}" \
                                    "{% if add_generation_prompt %}={% endif %}"
    try:
        assert codec.decode(codec.prompt_ids(chat)) == "rev:abc=="
        ref = codec.tokenizer.apply_chat_template([{"role": "user", "content": "rev:abc="}],
                                                  add_generation_prompt=True, tokenize=True)
        ref = ref["input_ids"] if isinstance(ref, dict) or hasattr(ref, "keys") else ref
        assert codec.prompt_ids(chat) == list(ref)
    finally:
        codec.tokenizer.chat_template = None


def test_task_file_round_trip_with_splits_and_chat(tmp_path: Path) -> None:
    splits = {"pool": [Prompt("a"), Prompt("", None, (("system", "s"), ("user", "u")))],
              "test": [Prompt("b", "B"), Prompt("", "ans", (("user", "q"),))]}
    path = tmp_path / "task.jsonl"
    assert write_task_prompts(path, splits) == 4
    assert prompt_splits(path) == {"pool": 2, "test": 2}
    for split, rows in splits.items():
        assert read_prompts(path, split=split) == rows
    with pytest.raises(PromptDataError, match=r"no 'val' split \(it has pool, test\)"):
        read_prompts(path, split="val")


@pytest.mark.parametrize("line, message", [
    ('{"messages": []}', "non-empty list"),
    ('{"messages": [{"role": "user"}]}', "exactly \"role\" and \"content\""),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "is not one of system, user, assistant"),
    ('{"messages": [{"role": "assistant", "content": "x"}]}', "must end with a user turn"),
    ('{"messages": [{"role": "user", "content": "x"}], "prompt": "y"}', "unknown field(s) 'prompt'"),
    ('{"prompt": "x", "split": "../etc"}', "\"split\" must be a name"),
    ('[' * 5000 + ']' * 5000, "invalid JSON"),
])
def test_bad_chat_and_split_lines(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "fine"}\n' + line + "\n")
    with pytest.raises(PromptDataError) as err:
        read_prompts(path)
    assert message in str(err.value) and "line 2" in str(err.value) and "\n" not in str(err.value)


def test_codec_needs_a_tokenizer(tmp_path: Path) -> None:
    with pytest.raises(ZooError, match="has no tokenizer files"):
        TextCodec.from_folder(tmp_path)


def test_same_answer_trims_only_whitespace() -> None:
    assert same_answer(" 46\n", "46") and not same_answer("46", "046") and not same_answer("Q", "q")


def test_registered_generative_task(registry, tmp_path: Path) -> None:
    reg = registry
    path = tmp_path / "t.jsonl"
    write_task_prompts(path, {"pool": [Prompt("a"), Prompt("b")], "test": [Prompt("c", "C")]})
    info = reg.add_task("upper", data=path)
    assert info["data_format"] == "zoo-prompts-jsonl-v1" and info["splits"] == {"pool": 2, "test": 1}
    assert reg.task_data("upper").read_bytes() == path.read_bytes()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"answer": "x"}\n')
    with pytest.raises(PromptDataError, match="line 2: missing \"prompt\""):
        reg.add_task("broken", data=bad)
    assert [t["name"] for t in reg.tasks()] == ["upper"]  # nothing was written
