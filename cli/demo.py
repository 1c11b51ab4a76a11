"""``zoo demo``: the five-minute tour, one call to ``zoo.demo.run`` and its report."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from zoo.cli import render
from zoo.cli.options import JsonOpt, RegistryOpt, Typer, open_registry

if TYPE_CHECKING:
    from zoo.demo.llm_tour import LlmTour
    from zoo.demo.tour import Tour

app = Typer()


@app.command()
def demo(quick: bool = typer.Option(False, "--quick", help="A tiny, fast build of the same zoo (for CI)."),
         learned: Optional[bool] = typer.Option(None, "--learned/--no-learned",
                                                help="Also the learned merges (default: on, off with --quick)."),
         protection: bool = typer.Option(True, "--protect/--no-protect",
                                         help="Also protect one expert with MergeLock and merge with it."),
         publishing: bool = typer.Option(True, "--publish/--no-publish",
                                         help="End by pushing the best merge (protected) through a local "
                                              "`zoo serve` and pulling it back (the classifier demo)."),
         llm: bool = typer.Option(False, "--llm",
                                  help="The LLM demo instead: a tiny Llama base, one causal-LM expert per text "
                                       "task, merged and measured by greedy exact match."),
         as_json: bool = JsonOpt,
         registry: Optional[Path] = RegistryOpt) -> None:
    """Build the demo zoo offline (cached), register it, merge it, and print the accuracy
    of each expert and each merge per task; then protect one expert, merge with it and
    attack it; then publish the best merge through a local `zoo serve` and pull it back.
    With --llm: the same for causal-LM experts on generative tasks, in exact match."""
    import zoo.demo

    log = (lambda m: print(m, file=sys.stderr)) if as_json else print
    if llm:
        from zoo.demo.llm_tour import run_llm

        with render.training_bar("learning") as report:
            got = run_llm(open_registry(create=True), quick=quick, learned=True if learned is None else learned,
                          protection=protection, log=log, report=report)
        if as_json:
            render.emit_json(got.to_dict())
        else:
            print_llm_tour(got)
        return
    with render.training_bar("learning") as report:
        tour = zoo.demo.run(open_registry(create=True), quick=quick, learned=learned, protection=protection,
                            publishing=publishing, log=log, report=report)
    if as_json:
        render.emit_json(tour.to_dict())
    else:
        print_tour(tour)


def print_tour(tour: "Tour") -> None:
    res, tasks = tour.zoo, tour.tasks
    print()
    table = [{"method": r["method"], **{t: f"{100 * r[t]:.1f}" for t in [*tasks, "avg"]}} for r in tour.table]
    columns = [("method", "TEST ACCURACY %")] + [(t, t) for t in tasks] + [("avg", "AVG")]
    if tour.masks:  # the Concrete rows: is the learned mask a subspace, or a soft re-weighting?
        table = mask_columns(table, tour.masks)
        columns += [("above_half", "MASK>½ %"), ("binariness", "BINARY")]
    render.table(table, columns)
    for p in tour.parity:
        vs_entropy = "" if p["entropy_adamerging_avg"] is None else \
            f"; label-free entropy AdaMerging: {100 * p['entropy_adamerging_avg']:.1f}"
        print(f"\n{p['method']}: disagreement with the experts on their pools "
              f"{100 * p['disagreement_start']:.1f}% → {100 * p['disagreement_end']:.1f}% "
              f"({100 * (1 - p['disagreement_end'] / p['disagreement_start']):.0f}% less, target ≥ 50%); "
              f"average accuracy {100 * p['start_avg']:.1f} → {100 * p['avg']:.1f}, "
              f"{100 * (p['avg'] - p['ta_avg']):+.1f} points over task arithmetic (target ≥ +10){vs_entropy}")
    if tour.protection is not None:
        print()
        _print_protection(tour.protection, tasks)
    if tour.published is not None:
        pub = tour.published
        print(f"\npublished {pub['merge']} ({pub['method']}) through zoo serve as {pub['pushed']} "
              f"(MergeLock-protected) and pulled it back as {pub['pulled']}: average test accuracy "
              f"{100 * pub['avg_before']:.1f} → {100 * pub['avg_after']:.1f} (largest change on a task "
              f"{100 * pub['max_change']:.2f} points)")
    print(f"\nbase: {res.base}   experts: {', '.join(res.experts.values())}")
    print(f"({'built' if res.built else 'cached'}; {res.seconds:.0f} s)")
    print(f"registry: {res.registry}\nstore:    {res.store}\nkeys:     {tour.keys}\ncache:    {res.cache}")
    p = res.config.prefix
    print(f"next: `zoo list`, `zoo lineage {p}-ties`, `zoo check {p}-parity`, `zoo eval {p}-ta --task hflip`")
    print(f"compare the merges in a browser: run `zoo serve`, then open http://127.0.0.1:8000{tour.compare_path}")


def print_llm_tour(tour: "LlmTour") -> None:
    tasks = tour.tasks
    print()
    cells = [{"method": r["method"], **{t: f"{100 * r[t]:.1f}" if t in r else "" for t in [*tasks, "avg"]},
              "time": f"{r['seconds']:.1f}" if "seconds" in r else "",
              "cpu": f"{r['cpu_seconds']:.1f}" if "cpu_seconds" in r else "",
              "steps": f"{r['steps_per_second']:.2f}" if "steps_per_second" in r else "",
              "peak": f"{r['peak_rss_mib']:.0f}" if r.get("peak_rss_mib") else ""} for r in tour.table]
    render.table(cells, [("method", "TEST EXACT MATCH %")] + [(t, t) for t in tasks]
                 + [("avg", "AVG"), ("time", "MERGE s"), ("cpu", "CPU s"), ("steps", "STEPS/s"), ("peak", "PEAK MiB")])
    for r in tour.table:
        if "not_run" in r:
            print(f"not run: {r['method']}: {r['not_run']}")
    if tour.parity is not None:
        p = tour.parity

        def change(start: float | None, end: float | None) -> str:
            if start is None or end is None:
                return "n/a"
            less = f" ({100 * (1 - end / start):.0f}% less)" if start else ""
            return f"{100 * start:.1f}% → {100 * end:.1f}%{less}"
        print(f"\nparity from task arithmetic (round {p['kept_round']} kept): disagreement with the experts on their "
              f"reliable pool prompts {change(p['disagreement_start'], p['disagreement_end'])}, on their whole pools "
              f"{change(p['pool_disagreement_start'], p['pool_disagreement_end'])}; average exact match "
              f"{100 * p['avg']:.1f}, {100 * (p['avg'] - p['ta_avg']):+.1f} points over task arithmetic")
    if tour.protection is not None:
        locked = tour.protection
        victim = locked["victim"]
        print()
        render.table([{"method": r["method"], **{t: f"{100 * r[t]:.1f}" if t in r else "" for t in tasks}}
                      for r in locked["rows"]], [("method", f"MERGELOCK ({victim} protected) %")]
                     + [(t, t) for t in tasks])
        for r in locked["rows"]:
            if "not_run" in r:
                print(f"not run: {r['method']}: {r['not_run']}")
        v = locked.get("verify") or {}
        if v:
            print(f"protected {victim} expert vs original: max relative logit error {v['max_rel_error']:.1e}, "
                  f"top-1 agreement {100 * v['top1_agreement']:.0f}%")
    print(f"\nbase: {tour.base}   experts: {', '.join(tour.experts.values())}")
    print(f"({'built' if tour.built else 'cached'}; {tour.seconds:.0f} s, {tour.cpu_seconds:.0f} CPU s; a merge's "
          "time, steps per second and the process's peak memory are measured in this process, on "
          f"{tour.threads} torch thread(s))")
    print(f"registry: {tour.registry}\ncache:    {tour.folder}")
    print(f"next: `zoo tasks`, `zoo eval {tour.prefix}-ta --task {tasks[0]}`, `zoo lineage {tour.prefix}-ta`")


def mask_columns(table: list[dict[str, Any]], masks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The demo's table with each Concrete row's mask: the share of entries whose keep
    probability is above ½, and its binariness (mean |2p - 1|); blank elsewhere."""
    by_method = {m["method"]: m for m in masks}
    out = []
    for row in table:
        m = by_method.get(row["method"])
        out.append({**row, "above_half": f"{100 * m['above_half']:.1f}" if m and "above_half" in m else "",
                    "binariness": f"{m['binariness']:.2f}" if m else ""})
    return out


def _print_protection(locked: dict[str, Any], tasks: list[str]) -> None:
    s = locked["summary"]
    victim = s["victim"]
    table = [{"method": r["method"], **{t: f"{100 * r[t]:.1f}" if t in r else "" for t in tasks}}
             for r in locked["rows"]]
    render.table(table, [("method", f"MERGELOCK ({victim} protected) %")] + [(t, t) for t in tasks])
    v = s["verify"]
    print(f"\nprotected {victim} expert vs original: max relative logit error {v['max_rel_error']:.1e}, "
          f"top-1 agreement {100 * v['top1_agreement']:.0f}% (cond QK ≤ {v['max_cond_qk']:.0f}, "
          f"VO ≤ {v['max_cond_vo']:.0f}); chance on {victim}: {100 * s['chance']:.1f}%")
    for key, label in (("ta", "task arithmetic"), ("ties", "TIES")):
        m = s[key]
        lost = "n/a" if m["advantage_lost"] is None else f"{100 * m['advantage_lost']:.0f}%"
        back = "n/a" if m["recovered"] is None else f"{100 * m['recovered']:.0f}%"
        print(f"{label}: protection removes {lost} of the merge's advantage over chance on {victim} "
              f"(target ≥ 80%); the realignment attack recovers {back} of what it removed")
        if m.get("parity") is not None:
            again = "n/a" if m["parity_recovered"] is None else f"{100 * m['parity_recovered']:.0f}%"
            print(f"{label}, then parity distillation with the protected expert teaching {victim}: {victim} at "
                  f"{100 * m['parity']:.1f}% (recovers {again}); the protected expert's labels are the original's")
    print("MergeLock stops naive merging only: the data-free attack above undoes much of it, and outputs are "
          "unchanged, so distillation from the protected expert works as from the original.")
