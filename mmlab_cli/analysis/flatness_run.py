"""Flatness of run directories: `analyse_flatness(run_dirs, settings, **options)` is `mmlab flatness` as a
library function (the sweep calls it too): check the inputs, open the runs (analysis/runs.py), measure each
with `analyse_run` (reusing what its flatness.json already holds for these settings), print the headline table
and compare several runs. Measuring is flatness.py's, the files flatness_output.py's."""

from __future__ import annotations

import torch

from mmlab_cli.analysis.common import previous_result, run_identity, same_measurement
from mmlab_cli.analysis.flatness import METRICS, SCHEMA, STILL_VALID, FlatnessSettings, flatness, summary
from mmlab_cli.analysis.flatness_output import compare, convergence, print_table, write_run_outputs
from mmlab_cli.analysis.runs import Analysed, RunOptions, open_analysis
from mmlab_cli.analysis.stability import stability
from mmlab_cli.console import console
from mmlab_cli.data.format import atomic_write_json
from mmlab_cli.engine.checkpoint import find_checkpoint, load_state
from mmlab_cli.engine.rundir import Run


def analyse_flatness(run_dirs, settings: FlatnessSettings | None = None,
                     options: RunOptions | dict | None = None) -> Analysed:
    """Hessian spectrum, LPF, F_gap and landscapes of each run (flatness.{json,md,csv}, CSV/NPZ/PNG into the
    checkpoint's analyses folder), the headline table on the console, and with two runs or more the
    comparison in `options.out` (default: compare/flatness in their common folder). A bad setting, a block a
    run lacks or a run an analysis must not read is one line (MmlabError) before anything is measured."""
    s = (settings or FlatnessSettings()).check()
    analysis = open_analysis("flatness", run_dirs, options)
    for run in analysis.runs:
        s.blocks_for(run.model.modalities)

    def measure(run: Run) -> dict:
        result = analyse_run(run, s, analysis.device, analysis.options.checkpoint, analysis.options.force)
        reused = f" (reused: {', '.join(result['reused'])})" if result["reused"] else ""
        console.print(f"[bold]{run.paths.root}[/]: wrote flatness.json/.md and {len(result['files']) - 2} more "
                      f"files{reused}")
        if "hessian" in result:
            console.print(f"  Lanczos convergence (top-k converged): {convergence(result)}")
        return result

    results = analysis.each(measure)
    print_table(results)
    return analysis.analysed(results, compare)


def _reusable(old: dict, identity: dict, s: FlatnessSettings) -> dict:
    """Metric blocks of an earlier flatness.json measured on the same checkpoint bytes and subset: the
    requested ones only if their settings match, the others to keep in the file. Of a file of an older schema,
    only the blocks still measured the same way (STILL_VALID): F_gap of schema 2 is measured again."""
    valid = METRICS if old.get("schema") == SCHEMA else STILL_VALID.get(old.get("schema"), ())
    same = same_measurement({**old, "schema": SCHEMA}, SCHEMA, identity) and \
        all(old.get("settings", {}).get(k) == getattr(s, k) for k in ("split", "samples", "seed"))
    if not same:
        return {}
    return {m: old[m] for m in valid if m in old and (m not in s.metrics or old[m].get("settings") == s.of(m))}


def analyse_run(run: Run, settings: FlatnessSettings, device: torch.device, checkpoint: str = "best",
                force: bool = False) -> dict:
    """flatness() of a loaded run plus its identity, merged with reusable blocks of its flatness.json, written."""
    s = settings.check()
    identity = run_identity(run, checkpoint)
    out = run.paths.analyses(checkpoint)
    out.mkdir(exist_ok=True)
    path = out / "flatness.json"
    previous = None if force else previous_result(path)
    old = {} if previous is None else _reusable(previous, identity, s)
    requested = {m: old[m] for m in s.metrics if m in old}
    kept = {m: b for m, b in old.items() if m not in s.metrics}
    result = flatness(run.model, run.dataset, s, device, run.paths.root / "flatness_cache",
                      identity["checkpoint_sha256"], requested)
    state = load_state(find_checkpoint(run.paths.best if checkpoint == "best" else run.paths.last))
    result = {**identity, **result, **kept, "stability": stability(state, run.config.optimizer)}
    result = {**result, **summary(result), "reused": sorted(requested)}
    path.unlink(missing_ok=True)  # the files below change: the old result no longer describes them
    write_run_outputs(result, out)  # sets result["files"]
    atomic_write_json(path, result)
    return result
