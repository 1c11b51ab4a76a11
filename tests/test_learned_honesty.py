"""Label honesty: a learned merge that claims not to use some labels gives the same
bytes when those labels are permuted, and anything that reads a label says so in
the lineage and the card."""

from __future__ import annotations

import pytest
import torch

import zoo.merge as merge
from conftest import LABELS
from zoo import open_checkpoint
from zoo.checkpoints.taskdata import load_split, save_task_data, task_info


def recipe(method: str, **params):
    return merge.from_dict({"merge_method": method, "base_model": "base", "seed": 0,
                            "models": [{"model": f"e{i}"} for i in range(len(LABELS))], "parameters": params})


def weights(registry, name):
    ck = open_checkpoint(registry.model_dir(name))
    return {n: ck.read_tensor(n) for n in ck.tensors}


def permute_labels(registry, tmp_path, splits: tuple[str, ...]) -> None:
    """Re-register every task with the labels of ``splits`` shifted by one class (each
    label changes), the inputs untouched."""
    for i, k in enumerate(LABELS):
        path = registry.task_data(f"t{i}")
        info = task_info(path)
        data = {}
        for split in info["splits"]:
            x, y = load_split(path, split)
            data[split] = (x, (y + 1) % k if split in splits else y)
        out = tmp_path / f"t{i}-permuted-{'-'.join(splits)}.safetensors"
        save_task_data(out, data, [str(j) for j in range(k)])
        registry.add_task(f"t{i}", [str(j) for j in range(k)], data=out, replace=True)


LABEL_FREE = {
    "adamerging": {"steps": 3, "coefficients": "layer"},
    "adamerging++": {"steps": 3, "ties": True},
    "concrete_ta": {"steps": 3},
    "concrete_adamerging": {"steps": 2, "stage2_steps": 2},
    "parity": {"rounds": 2, "steps": 4, "lr": 0.05},
}


@pytest.mark.parametrize("key", list(LABEL_FREE))
def test_label_free_methods_give_the_same_bytes_with_test_and_val_labels_permuted(registry, tiny, tmp_path, key):
    method = "adamerging" if key == "adamerging++" else key
    before = merge.run(recipe(method, **LABEL_FREE[key]), "a", registry=registry)
    permute_labels(registry, tmp_path, ("test", "val"))
    after = merge.run(recipe(method, **LABEL_FREE[key]), "b", registry=registry)
    a, b = weights(registry, "a"), weights(registry, "b")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    learned = registry.show("b")["recipe"]["learned"]
    assert learned["supervised"] is False and learned.get("labels_read", []) == []
    if key == "parity":  # it did read the test labels, to measure them, and nothing else
        accuracy = {(r["round"], r["task"]): r["accuracy"] for r in before["parity"]}
        assert any(r["accuracy"] != accuracy[r["round"], r["task"]] for r in after["parity"])


def test_supervised_merges_ignore_test_labels_but_not_validation_labels(registry, tiny, tmp_path):
    params = {"objective": "ce", "steps": 3}
    merge.run(recipe("adamerging", **params), "a", registry=registry)
    permute_labels(registry, tmp_path, ("test",))
    merge.run(recipe("adamerging", **params), "b", registry=registry)
    permute_labels(registry, tmp_path, ("test", "val"))
    merge.run(recipe("adamerging", **params), "c", registry=registry)
    a, b, c = (weights(registry, n) for n in "abc")
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert any(not torch.equal(a[n], c[n]) for n in a)  # the test can fail: ce reads val labels
    learned = registry.show("a")["recipe"]["learned"]
    assert learned["supervised"] is True and learned["labels_read"] == ["val"]


def test_calibration_reads_labels_so_the_run_is_supervised_everywhere(registry, tiny):
    merge.run(recipe("adamerging", steps=2, calibrate=True), "cal", registry=registry)
    learned = registry.show("cal")["recipe"]["learned"]
    assert learned["objective"] == "entropy"
    assert learned["supervised"] is True and learned["labels_read"] == ["val"]
    card = (registry.model_dir("cal") / "README.md").read_text()
    assert "supervised" in card and "label-free" not in card


def test_parity_from_a_supervised_start_is_supervised(registry, tiny):
    merge.run(recipe("concrete_ta", steps=2, objective="ce"), "cta-ce", registry=registry)
    merge.run(recipe("parity", start="cta-ce", rounds=1, steps=2, tau=0.05, view="none"), "p", registry=registry)
    learned = registry.show("p")["recipe"]["learned"]
    assert learned["supervised"] is True and learned["start"]["supervised"] is True
    card = (registry.model_dir("p") / "README.md").read_text()
    assert "supervised, since its start read labels" in card
    merge.run(recipe("parity", rounds=1, steps=2, tau=0.05, view="none"), "p2", registry=registry)
    assert registry.show("p2")["recipe"]["learned"]["supervised"] is False
