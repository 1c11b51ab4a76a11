"""Each learned method, run with no ``steps`` given, runs the steps its parameter table
documents: one table of defaults per method (concrete_ta once ran 500 steps, not 2000,
and concrete_adamerging 500 + 1000, not 1000 + 1000)."""

from __future__ import annotations

import pytest
import torch

import zoo.merge as merge
from zoo.merge.learning import learn_from_plan
from zoo.merge.methods import get_method
from zoo.merge.plan import make_plan

# The step counts the README and `zoo merge --method X --help` document.
DOCUMENTED = {"adamerging": 500, "concrete_ta": 2000, "concrete_adamerging": 1000 + 1000, "parity": 3 * 100}


@pytest.fixture
def one_thread():
    """A tiny model's steps run fastest on one thread (and leave the other cores alone)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_the_tables_say_what_is_documented():
    steps = {name: get_method(name).parameters["steps"].default for name in DOCUMENTED}
    steps["concrete_adamerging"] += get_method("concrete_adamerging").parameters["stage2_steps"].default
    steps["parity"] *= get_method("parity").parameters["rounds"].default
    assert steps == DOCUMENTED


@pytest.mark.parametrize("method", list(DOCUMENTED))
def test_no_steps_runs_the_default(registry, tiny, method, one_thread):
    # One task and one example a step keep it quick; neither is a step count. Parity:
    # tau and lr so small that the parity set never empties (which would end it early).
    params = {"batch_size": 1} if method != "parity" else {"batch_size": 1, "tau": 0.05, "view": "none",
                                                           "lr": 1e-9, "eval_split": "none"}
    recipe = merge.from_dict({"merge_method": method, "base_model": "base", "models": [{"model": "e0"}],
                              "parameters": params})
    result, used = learn_from_plan(make_plan(recipe, registry), registry, torch.device("cpu"))
    assert result.steps_done == used["steps"] == DOCUMENTED[method]
    if method == "concrete_adamerging":
        stages = [h["stage"] for h in result.history]
        assert stages.count(1) == 1000 and stages.count(2) == 1000
    if method == "parity":
        assert used["rounds"] == 3 and {h["round"] for h in result.history} == {1, 2, 3}
