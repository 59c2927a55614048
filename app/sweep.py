"""Honest hyper-parameter sweeps: chosen on validation, reported once on test, the control on the same budget.

    python sweep.py --config NAME --method fsa_offline --grid finetune.lr=0.001,0.01 finetune.iterations=200,400 \\
        --seeds 0 1 2 --against crt la_posthoc

This module runs a sweep: its grid (:mod:`app.sweep_grid`) and the runs laid out for it (:mod:`app.sweep_plan`)
are checked against what exists on disk, its size and expected wall time printed, then each step goes through
the pipeline's own step logic (``app.steps.step_state`` / ``step_opts`` / ``skip_notes``,
``app.pipeline.run_step``): a finished run is skipped, an interrupted one resumed, a stale one started again;
``--opts`` that an existing run of a note would ignore is refused (``app.steps.check_existing_runs``), and so
is a finished phase III run that read other phase I / II runs than the plan gives it (:func:`check_sources`).
Last, each arm's point is chosen on validation and the report written (:mod:`app.sweep_report`).
"""
from __future__ import annotations

import time
from pathlib import Path

from app.data_install import ensure_fashion_mnist
from app.pipeline import run_step
from app.steps import chain_seed, check_existing_runs, step_opts, step_state
from app.sweep_grid import point_text, reading_methods
from app.sweep_plan import Plan, Run, SweepSpec, plan
from app.sweep_report import build_report, load_run_results, report_dir
from engine.cost import approx_seconds, probe_rates, step_work
from engine.workload import Sizes
from utils import distributed
from utils.config import CONFIG_PHASES, config_text, load_config
from utils.errors import UserError
from utils.layout import RunPaths
from utils.provenance import git_state

__all__ = ["check_sources", "resolved_configs", "run"]

PREFIX = "[sweep]"


def say(message: str) -> None:
    if distributed.first_process():
        print(f"{PREFIX} {message}", flush=True)


# ------------------------------------------------------------------------------------------------
# Running
# ------------------------------------------------------------------------------------------------
def _check_existing(plan_: Plan) -> None:
    """``app.steps.check_existing_runs`` note by note: --opts or grid values that an existing run would ignore."""
    by_note: dict[str, list[Run]] = {}
    for run in plan_.runs:
        by_note.setdefault(run.note, []).append(run)
    for note, runs in by_note.items():
        check_existing_runs([r.step for r in runs], plan_.sources, plan_.name, [(note, runs[0].opts)], runs[0].keys)


def _check_upstream_split(plan_: Plan) -> None:
    """An existing phase I run that phase III points read must have a validation split (a run made before
    the config had one would select nothing)."""
    bad = []
    for run in plan_.runs:
        if run.step.kind != "phase_i" or run.step.teacher:
            continue
        saved = RunPaths(run.step.folder(), plan_.name, run.note).checkpoint_dir / "config.yaml"
        if saved.is_file():
            try:
                cfg = load_config(str(saved), "phase_i", saved=True)
            except UserError:
                continue  # the run's own step says why
            if cfg["dataset"]["val"]["source"] == "none":
                bad.append(str(saved.parent))
    if bad:
        raise UserError(f"phase I run(s) {', '.join(bad)} were made without a validation split (their config.yaml: "
                        f"dataset.val.source: none), so nothing built on them could be chosen on validation. Give the "
                        f"sweep its own notes with --note NAME (its base notes become NAME-seedN), or rerun those runs "
                        f"with a validation split (--overwrite).")


def _sha256(path: Path, cache: dict[Path, str]) -> str:
    from engine.phase_ii_outputs import sha256_file

    if path not in cache:
        cache[path] = sha256_file(path)
    return cache[path]


def check_sources(plan_: Plan) -> None:
    """Every finished phase III run of the swept arms read the phase I / II it should: its results.json's
    ``upstream_note`` is the note the plan gives it (a run of that note made otherwise, e.g. by hand, would
    be skipped as finished), and the phase I checkpoint it recorded (``phase_i_checkpoint_sha256``) has the
    content the upstream's best_model.pt has now (not retrained since). A UserError naming each stale run
    and the command that reruns it."""
    stale, cache = [], {}
    for run in plan_.runs:
        if run.step.kind != "phase_iii":
            continue
        results = load_run_results(RunPaths(run.step.folder(), plan_.name, run.note).results)
        if not results or not results.get("finished"):
            continue
        wanted = run.upstream or run.note
        got = results.get("upstream_note", run.note)
        best = RunPaths(run.step.arm.backbone.folder, plan_.name, wanted).best
        why = None
        if got != wanted:
            why = f"it read the phase I / II of note '{got}', the sweep's point reads note '{wanted}'"
        elif best.is_file() and results.get("phase_i_checkpoint_sha256") not in (None, _sha256(best, cache)):
            why = f"its phase I checkpoint has changed since it was trained ({best}: retrained or edited)"
        if why:
            args = step_opts(run.step, run.opts)
            extra = [*(["--upstream-note", run.upstream] if run.upstream else []), "--overwrite", "--opts", *args]
            stale.append(f"{RunPaths(run.step.folder(), plan_.name, run.note).checkpoint_dir}: {why}; rerun it: "
                         f"{run.step.arm.command(plan_.name, run.note, *extra)}")
    if stale:
        raise UserError(f"{len(stale)} finished phase III run(s) of this sweep do not pair with the phase I / II runs "
                        f"the sweep gives them, and a finished run is not rerun: {'; '.join(stale)}.")


def _pending(plan_: Plan) -> list[Run]:
    return [run for run in plan_.runs if step_state(run.step, plan_.name, run.note)[0] != "finished"]


def _describe(plan_: Plan) -> None:
    """The sweep's grid, what collapses for which arm, and its size (points x seeds x runs)."""
    seeds = plan_.notes.seed_keys()
    grid = " x ".join(f"{k.key}={','.join(k.values)}" for k in plan_.grid)
    swept = plan_.swept
    say(f"config '{plan_.name}': {' and '.join(f'{a.role.id} ({a.role.role})' for a in swept)} over the grid {grid} "
        f"({len(plan_.points)} points), seeds {', '.join('none' if s is None else str(s) for s in seeds)}; chosen by "
        f"mean validation mean class accuracy over the seeds, reported once on test")
    for arm_runs in swept:
        role = arm_runs.role
        collapsed = [k for k in plan_.grid if k.key not in role.keys]
        if collapsed:
            say(f"{role.id}: {', '.join(k.key for k in collapsed)} {'does' if len(collapsed) == 1 else 'do'} not apply "
                f"to it (read by {'; '.join(reading_methods(k) for k in collapsed)}): its grid collapses to "
                f"{len(arm_runs.points)} point(s), each run once")
    per_point = len(swept)
    distinct = sum(len(a.points) for a in swept) * len(seeds)
    total = len(plan_.points) * len(seeds) * per_point
    others = [r for r in plan_.runs if not any(r.note in n.values() and r.step.arm == a.role.arm
                                               for a in swept for n in a.notes.values())]
    against = [a.role.id for a in plan_.arms if a.role.role == "against"]
    say(f"size: {len(plan_.points)} points x {len(seeds)} seed(s) x {per_point} run(s) "
        f"({', '.join(a.role.id for a in swept)}) = {total} runs"
        + (f", {distinct} distinct after collapsing" if distinct != total else "")
        + f"; besides them {len(others)} step(s) (phase I / II of {len({r.note for r in others if r.step.kind != 'phase_iii'})} "
          f"note(s){'; against: ' + ', '.join(against) if against else ''})")


def _expected(plan_: Plan, pending: list[Run], device) -> None:
    """Expected wall time of the pending steps (:mod:`engine.cost`: a probe of this device, each step's work)."""
    from datasets import build_datasets

    phase_i_cfg = load_config(plan_.sources["phase_i"], "phase_i", pending[0].opts["phase_i"])
    bundle = build_datasets(phase_i_cfg["dataset"])
    sizes = Sizes.of(bundle)
    rates = probe_rates(phase_i_cfg, bundle, device, distributed.context().world_size)
    by_kind: dict[str, float] = {}
    for run in pending:
        step = run.step
        seed = chain_seed(plan_.sources, run.opts) if step.teacher else None
        cfg = load_config(plan_.sources[step.config_phase()], step.config_phase(), step_opts(step, run.opts, seed))
        kind = {"phase_i": "phase I", "phase_ii": "phase II", "phase_iii": "phase III"}[step.kind]
        by_kind[kind] = by_kind.get(kind, 0.0) + step_work(step, cfg, sizes).seconds(rates)
    total = sum(by_kind.values())
    say(f"expected wall time of the {len(pending)} pending step(s): {approx_seconds(total)} ("
        + ", ".join(f"{kind} {approx_seconds(s)}" for kind, s in by_kind.items())
        + f"), from a {rates.probe_s:.1f} s probe of the phase I model on {device}: {rates.trained * 1e3:.3g} ms per image "
          f"trained, {rates.forwarded * 1e3:.3g} ms per image forwarded; classifier-only training counts as free")


# ------------------------------------------------------------------------------------------------
# The command
# ------------------------------------------------------------------------------------------------
def resolved_configs(spec: SweepSpec) -> str:
    """--print-config: each phase's config as the swept method's first run of the first grid point reads it
    (first seed; phase I / II: the run of the note it reads them from)."""
    plan_ = plan(spec)
    method = plan_.arms[0]
    point = method.points[0]
    pair, note = next(iter(method.notes[point].items()))
    upstream = method.upstream[point].get(pair, note)
    run = next(r for r in plan_.runs if r.note == note and r.step.arm == method.role.arm and not r.step.teacher)
    out = []
    for phase in CONFIG_PHASES:
        own = phase == run.step.config_phase()
        opts = step_opts(run.step, run.opts) if own else run.opts[phase]
        where = note if own or method.role.arm.method.stage == "phase_i" else upstream
        out.append(f"--- # {phase} of note {where} ({point_text(point)})\n"
                   f"{config_text(load_config(plan_.sources[phase], phase, opts))}")
    return "".join(out)


def run(spec: SweepSpec) -> dict:
    """Plan the sweep, print its size and expected wall time, run every pending step, then the report."""
    plan_ = plan(spec)
    torch_device = distributed.setup_device(spec.device)
    _check_existing(plan_)
    _check_upstream_split(plan_)
    check_sources(plan_)
    _describe(plan_)
    pending = _pending(plan_)
    if pending:
        phase_i_cfg = load_config(plan_.sources["phase_i"], "phase_i", pending[0].opts["phase_i"])
        distributed.on_main(lambda: ensure_fashion_mnist(phase_i_cfg["dataset"], say))
        distributed.barrier()
        _expected(plan_, pending, torch_device)
    else:
        say(f"all {len(plan_.runs)} step(s) finished: nothing to run")
    if spec.dry_run:
        say("--dry-run: nothing run, no report written")
        return {}
    started, head = time.perf_counter(), git_state()
    total = len(plan_.runs)
    for i, one in enumerate(plan_.runs, 1):
        run_step(one.step, f"{plan_.name}/{one.note} {i}/{total} {one.step.label}:", plan_.sources, one.note,
                 spec.device, one.opts, head, None, upstream=one.upstream, talk=say)
    if not distributed.context().is_main:
        return {}
    check_sources(plan_)
    data = build_report(spec, plan_)
    say(f"done in {time.perf_counter() - started:.1f} s; report in {report_dir(spec, plan_)}/")
    return data
