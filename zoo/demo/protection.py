"""The demo's protection step: does MergeLock stop a merge, and does the attack undo it?

One demo expert (the victim) is protected and merged with the other experts by task
arithmetic and by TIES, exactly as the unprotected merges were. The table has each
task's accuracy for the merge without protection, with the protected expert, and with
the expert the realignment attack recovers from the protected one and the public base;
and the victim alone, before and after protection. This is where protection meets the
merge engine, so it imports ``merge``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from zoo.demo.build import DemoResult
from zoo.registry import Registry
from zoo.checkpoints.taskdata import load_split

from zoo.protect.attack import realign
from zoo.protect.run import protect

VICTIM = "digit"  # the task whose expert is protected: the one the other tasks merge best with
SEED = 0


def chance(registry: Registry, task: str) -> float:
    """Accuracy of always predicting the test split's most common label."""
    _, y = load_split(registry.task_data(task), "test")
    return torch.bincount(y.long()).max().item() / len(y)


def protect_demo(registry: Registry, demo: DemoResult, merge_rows: list[dict[str, Any]],
                 log: Callable[[str], None] = print, victim: str = VICTIM, learned: bool = False,
                 report=None) -> dict[str, Any]:
    """Protect ``victim``'s expert, merge with it, attack it; with ``learned``, also level
    the task-arithmetic merge by parity distillation, the protected expert teaching its
    task. Return the table and the headline numbers."""
    from zoo.demo.merges import LABELS, MERGES, PARITY, measure, merge_experts

    prefix, tasks = demo.config.prefix, list(demo.experts)
    locked, realigned = f"{prefix}-{victim}-locked", f"{prefix}-{victim}-realigned"
    if not registry.has(locked):
        info = protect(demo.experts[victim], locked, registry=registry, seed=SEED, verify=True)
        log(f"protected {demo.experts[victim]} into {locked} (key id {info['key_id']}, "
            f"max relative logit error {info['verify']['max_rel_error']:.1e})")
    if not registry.has(realigned):
        realign(registry, locked, realigned)
        log(f"ran the least-squares realignment attack on {locked} against {demo.base} into {realigned}")
    check = registry.show(locked)["recipe"]["verify"]
    by_method = {r.get("model"): r for r in merge_rows}
    rows, got = [], {}
    for key, spec in MERGES.items():
        plain = by_method[f"{prefix}-{key}"]
        rows.append({"method": LABELS[key], **{t: plain[t] for t in tasks}})
        for tag, swap in (("protected", locked), ("realigned", realigned)):
            name = f"{prefix}-{key}-{tag}-{victim}"
            if not registry.has(name):
                merge_experts(registry, spec, demo.base, list({**demo.experts, victim: swap}.values()), name)
                log(f"merged with {swap} in place of {demo.experts[victim]} into {name}")
            label = f"  … with {victim} {'protected' if tag == 'protected' else 'realigned by the attack'}"
            rows.append({"method": label, "model": name, **measure(registry, name, tasks)})
            got[key, tag] = rows[-1][victim]
        if learned and key == "ta":  # distillation needs outputs only: the protected expert teaches as well
            start, name = f"{prefix}-ta-protected-{victim}", f"{prefix}-ta-protected-{victim}-parity"
            if not registry.has(name):
                spec = {**PARITY["parity-ta"], "parameters": {**PARITY["parity-ta"]["parameters"], "start": start}}
                merge_experts(registry, spec, demo.base, list({**demo.experts, victim: locked}.values()), name,
                              report=report, prefix=prefix, log=log)
                log(f"levelled {start} by parity distillation, {locked} teaching {victim}, into {name}")
            rows.append({"method": f"  … with {victim} protected, then parity distillation ({victim}'s protected "
                                   "expert teaches)", "model": name, **measure(registry, name, tasks)})
            got[key, "parity"] = rows[-1][victim]
    alone = {"method": f"{victim} expert alone", victim: demo.accuracy[victim]}
    alone_locked = {"method": f"{victim} expert alone, protected", **measure(registry, locked, [victim])}
    rows += [alone, alone_locked]
    base = chance(registry, victim)
    summary = {"victim": victim, "chance": base, "verify": check}
    for key in MERGES:
        plain = by_method[f"{prefix}-{key}"][victim]
        locked_acc, realigned_acc = got[key, "protected"], got[key, "realigned"]
        summary[key] = {
            "unprotected": plain, "protected": locked_acc, "realigned": realigned_acc,
            # share of the merge's advantage over chance on the victim's task that protection removes
            "advantage_lost": 1 - (locked_acc - base) / (plain - base) if plain > base else None,
            # share of what protection removed that the attack brings back
            "recovered": (realigned_acc - locked_acc) / (plain - locked_acc) if plain > locked_acc else None,
        }
        if (key, "parity") in got:  # what distillation from the protected expert brings back
            summary[key]["parity"] = got[key, "parity"]
            summary[key]["parity_recovered"] = ((got[key, "parity"] - locked_acc) / (plain - locked_acc)
                                                if plain > locked_acc else None)
    return {"rows": rows, "summary": summary}


def publish_demo(registry: Registry, demo: DemoResult, merge_rows: list[dict[str, Any]],
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Serve a Hub on a free loopback port (its own registry, in a temporary folder), push
    the best merge to it (protected on the way, as ``zoo push`` does), pull it back under
    a new name and measure it again: the same accuracy, from the pulled bytes."""
    import tempfile
    from pathlib import Path

    from zoo.demo.merges import measure
    from zoo.hub.client import pull
    from zoo.hub.server import ServeSettings, running
    from zoo.hub.accounts import Accounts

    from zoo.publish import publish

    tasks = list(demo.experts)
    merges = [r for r in merge_rows if r.get("model")]
    best = max(merges, key=lambda r: r["avg"])
    pulled = f"{best['model']}-pulled"
    if registry.has(pulled):  # from an earlier run's server: that commit is gone with it
        registry.remove(pulled, force=True)
    with tempfile.TemporaryDirectory(prefix="zoo-demo-hub-") as tmp:
        server = Registry(Path(tmp) / "registry.db", create=True)
        token = Accounts(server).create_token("demo")["token"]
        with running(server, ServeSettings()) as url:
            log(f"zoo serve: a Hub on {url} (its own registry, for this demo)")
            repo = f"demo/{best['model']}"
            pushed = publish(registry, best["model"], repo, endpoint=url, token=token)
            log(f"pushed {pushed['pushed']} ({pushed['kind']}) to {repo}: commit {pushed['commit'][:12]}"
                + (f"; protected {best['model']} into it first" if pushed["protected_now"] else ""))
            got = pull(registry, repo, name=pulled, endpoint=url, token=token)
            log(f"pulled {repo}@{got['source']['hub_revision'][:12]} into {got['ref']} (every file checked "
                "against its hash)")
        server.close()
    after = measure(registry, pulled, tasks)
    before = {t: best[t] for t in tasks}
    return {"merge": best["model"], "method": best["method"], "pushed": pushed["pushed"], "repo": repo,
            "commit": pushed["commit"], "pulled": got["ref"], "before": before, "after": after,
            "avg_before": sum(before.values()) / len(tasks), "avg_after": sum(after.values()) / len(tasks),
            "max_change": max(abs(after[t] - before[t]) for t in tasks)}
