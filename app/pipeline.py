"""The whole chain for one config in one command, resumable, then the ablation report.

    python pipeline.py --config smoke
    python pipeline.py --config cifar10-LT_resnet18 --seeds 0 1 2 --device 0

Order, for each note: phase I (CE) -> phase II -> every phase III method of the suite on the CE
backbone, in the order of the method table (``engine.methods.METHODS``: the decoupled classifiers,
each FSA mode after its cRT control, then TailCalib and TailCalibX) -> the suite's other phase I
methods (each its own phase I run, ``phase_i-<id>``; a distilled one after its teacher runs
``<note>-teacher<k>``), each followed by its phase II and phase III arms when the suite has any on
it -> visualize; then one report over all notes. Suites (``--suite``): ``fsa`` (default) the chain,
both controls, TailCalib(X) and the post-hoc methods; ``full`` adds LWS, cRT and the other phase I
methods but CBD; ``tailcalibx`` the seven experiments of the TailCalibX release (CE, CosineCE, cRT,
CBD, TailCalib and TailCalibX on CosineCE, TailCalibX on CBD). The steps, their --opts and the
checks against existing runs are :mod:`app.steps`; this module runs them.

Every step calls its phase runner in this process with the spec its script would build.
A step whose finished outputs exist is skipped (its line says when they were made by another commit
or with a dirty tree, or with a config other than the one it would run with now: ``skip_notes``); an
interrupted training run (``last.pt`` without a finished ``results.json``) is resumed; phase II,
which has no resume, restarts an unfinished extraction. Rerunning the same command after an
interruption therefore continues where it stopped. Before the first step, the expected cost of the
pending steps is printed (:class:`StepCosts`).

``--seeds 0 1 2`` runs the chain for notes ``seed0 seed1 seed2`` (``NOTE-seed0 ...`` with ``--note
NOTE``) with ``seed=N`` passed as ``--opts`` to phases I, II and III (and visualize); the long-tailed
training subset is chosen by ``dataset.subset_seed``, which stays as configured, so every seed
trains on the same subset.

``--opts KEY=VALUE ...`` goes to every phase whose config schema has KEY (visualize reads phase
II's), after ``seed=N`` and before each phase III step's ``finetune.generator``; a key no phase
knows is refused before any step runs (``route_opts``). Because finished steps are skipped, --opts
that would change an existing run of the same note is refused too (``check_existing_runs``): a
variant is a new experiment, i.e. a new ``--note``.
"""
from __future__ import annotations

import shlex
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from app.data_install import ensure_fashion_mnist
from app.steps import (PHASE_LABELS, VISUALIZE_RUN, Step, chain_seed, check_configs_choose_nothing,
                       check_existing_runs, config_sources, notes_and_opts, plan_steps, route_opts, skip_notes,
                       step_opts, step_state)
from engine.cost import approx_seconds, probe_rates, step_work
from engine.workload import Rates, Sizes, Work
from utils import distributed
from utils.cli import RunSpec, VisualizeSpec
from utils.config import CONFIG_PHASES, config_name, load_config
from utils.errors import UserError
from utils.json_files import read_results
from utils.provenance import git_state

__all__ = ["StepCosts", "PipelineSpec", "run_step", "run"]

PREFIX = "[pipeline]"


def say(message: str) -> None:
    if distributed.first_process():  # under torchrun every rank runs the pipeline; rank 0 talks
        print(f"{PREFIX} {message}", flush=True)


def _spec(step: Step, source: str, note: str, device: str, opts: list[str], *, resume: bool,
          overwrite: bool) -> RunSpec:
    """The spec the step's script would build (``opts``: ``app.steps.step_opts``); visualize keeps its defaults."""
    if step.kind == "visualize":
        return VisualizeSpec(config=source, note=note, device=device, opts=tuple(opts), run_name=VISUALIZE_RUN)
    return RunSpec(config=source, note=note, device=device, opts=tuple(opts), resume=resume, overwrite=overwrite)


def _call(step: Step, spec: RunSpec):
    if step.kind == "phase_i":
        from engine import phase_i

        return phase_i.run(spec)
    if step.kind == "phase_ii":
        from engine import phase_ii

        return phase_ii.run(spec)
    if step.kind == "phase_iii":
        from engine import phase_iii

        return phase_iii.run(spec, step.method.mode)
    from app import visualize

    return visualize.run(spec)


def run_step(step: Step, tag: str, sources: dict[str, str], note: str, device: str,
             opts: dict[str, list[str]], head: tuple[str | None, bool | None], costs: StepCosts | None, *,
             upstream: str | None = None, talk: Callable[[str], None] = say) -> None:
    """Skip, resume or start one step of ``note``'s chain and say so (``talk``); ``upstream``: the note whose
    phase I / II a phase III step reads (sweep.py's grid points; None: its own)."""
    name = config_name(sources["phase_i"])
    state, where = step_state(step, name, note)
    args = step_opts(step, opts, chain_seed(sources, opts) if step.teacher else None)
    if state == "finished":
        notes = skip_notes(step, sources[step.config_phase()], name, note, args, Path(where), head)
        talk(f"{tag} skipped (finished: {where}{''.join(f'; {n}' for n in notes)})")
        return
    expected = costs.expected(note, step) if costs is not None else None  # keyed by the chain's note
    note = step.note(note)
    resume = state == "interrupted"
    overwrite = state == "stale" and step.kind != "visualize"
    reading = f" reading the phase I / II of note {upstream}" if upstream else ""
    with_opts = f"{reading} with --opts {shlex.join(args)}" if args else reading
    expecting = f" (expected {approx_seconds(expected)})" if expected is not None else ""
    if resume:
        talk(f"{tag} resumed from {where}{with_opts}{expecting.replace('expected', 'expected at most')}")
    elif state == "stale":
        talk(f"{tag} started again from scratch{with_opts} (unfinished, nothing to resume: {where}){expecting}")
    else:
        talk(f"{tag} started{with_opts}{expecting}")
    spec = _spec(step, sources[step.config_phase()], note, device, args, resume=resume, overwrite=overwrite)
    if upstream:
        spec = replace(spec, upstream_note=upstream)
    started = time.perf_counter()
    try:
        _call(step, spec)
        distributed.barrier()  # every rank sees the step's finished outputs before the next step's check
    except UserError:
        talk(f"{tag} failed after {time.perf_counter() - started:.1f} s")
        raise
    except KeyboardInterrupt:
        talk(f"{tag} interrupted after {time.perf_counter() - started:.1f} s")
        raise
    seconds = time.perf_counter() - started
    talk(f"{tag} finished in {seconds:.1f} s{expecting}")
    if costs is not None and not resume:
        costs.record(step, seconds)


class StepCosts:
    """Each pending step's expected seconds (:mod:`engine.cost`): the probe's estimate of its work, or
    what the same step took for an earlier note of this pipeline when it ran there from start to end."""

    def __init__(self, works: dict[tuple[str, str], Work], rates: Rates):
        self.works, self.rates, self.measured = works, rates, {}

    def expected(self, note: str, step: Step) -> float | None:
        if step.label in self.measured:
            return self.measured[step.label]
        work = self.works.get((note, step.label))
        return None if work is None else work.seconds(self.rates)

    def record(self, step: Step, seconds: float) -> None:
        self.measured.setdefault(step.label, seconds)


def _expected_costs(pending: dict[tuple[str, str], Step], runs: dict[str, dict[str, list[str]]],
                    sources: dict[str, str], phase_i_cfg: dict, device) -> StepCosts:
    """Probe this device (:func:`engine.cost.probe_rates`), print the expected cost of the pending steps
    (of the first note with any, then the total) and return them."""
    from datasets import build_datasets

    bundle = build_datasets(phase_i_cfg["dataset"])
    sizes = Sizes.of(bundle)
    rates = probe_rates(phase_i_cfg, bundle, device, distributed.context().world_size)
    works = {}
    for (note, label), step in pending.items():
        opts = runs[note]
        seed = chain_seed(sources, opts) if step.teacher else None
        cfg = None if step.kind == "visualize" else load_config(
            sources[step.config_phase()], step.config_phase(), step_opts(step, opts, seed))
        works[(note, label)] = step_work(step, cfg, sizes)
    costs = StepCosts(works, rates)
    say(f"expected cost, from a {rates.probe_s:.1f} s probe of the phase I model on {device}: "
        f"{rates.trained * 1e3:.3g} ms per image trained, {rates.forwarded * 1e3:.3g} ms per image forwarded "
        f"(data of {sizes.train:,} train / {sizes.val:,} val / {sizes.test:,} test images; classifier-only steps, "
        f"checkpoints and the report are not counted):")
    first = next(iter(pending))[0]
    for (note, label), step in pending.items():
        if note == first:
            work = works[(note, label)]
            say(f"  {label}: {work.what}, {approx_seconds(work.seconds(rates))}")
    notes = len({note for note, _ in pending})
    total = sum(work.seconds(rates) for work in works.values())
    say(f"  total {approx_seconds(total)} for {len(pending)} step(s) of {notes} note(s)")
    return costs


@dataclass(frozen=True)
class PipelineSpec:
    """What ``pipeline.py`` asks for (see its --help)."""

    config: str
    note: str | None = None
    seeds: tuple[int, ...] | None = None
    opts: tuple[str, ...] = ()
    device: str = "auto"
    suite: str = "fsa"


def run(spec: PipelineSpec) -> dict:
    """Run the chain for every note of ``spec``, then the report."""
    from analysis import report

    sources = config_sources(spec.config)
    name = config_name(sources["phase_i"])
    seeds = list(spec.seeds) if spec.seeds else None
    user_opts = route_opts(list(spec.opts), seeded=bool(seeds))
    # each note's --opts per config phase: seed=N of --seeds, then the user's
    runs = [(note, {phase: [*base, *user_opts[phase]] for phase in CONFIG_PHASES})
            for note, base in notes_and_opts(spec.note, seeds)]
    device = spec.device
    torch_device = distributed.setup_device(device)  # under torchrun: join the process group once, for every step
    # check every config (and the --opts) before the first hour of training
    cfgs = {phase: load_config(sources[phase], phase, runs[0][1][phase]) for phase in CONFIG_PHASES}
    for phase in ("phase_i", "phase_iii"):
        if cfgs[phase]["phase"] != "train":
            raise UserError(f"the {phase} config of '{name}' sets phase: {cfgs[phase]['phase']}, but the pipeline trains. "
                            f"Test a checkpoint with the phase's own script instead.")
    check_configs_choose_nothing(cfgs, name)
    steps = plan_steps(spec.suite, cfgs["phase_i"]["distill"]["teachers"])
    check_existing_runs(steps, sources, name, runs, user_opts)
    notes = [note for note, _ in runs]
    say(f"config '{name}', note(s) {', '.join(notes)}, device {device}, suite {spec.suite}: "
        f"{' -> '.join(s.label for s in steps)} -> report")
    if any(user_opts.values()):
        say("--opts: " + "; ".join(f"{PHASE_LABELS[phase]}: {shlex.join(user_opts[phase]) or '(none)'}"
                                    for phase in CONFIG_PHASES))

    started = time.perf_counter()
    head = git_state()  # the checkout every skipped step's provenance is compared with
    pending = {(note, step.label): step for note, _ in runs for step in steps
               if step_state(step, name, note)[0] != "finished"}
    costs = None
    if pending:
        distributed.on_main(lambda: ensure_fashion_mnist(cfgs["phase_i"]["dataset"], say))
        distributed.barrier()
        costs = _expected_costs(pending, dict(runs), sources, cfgs["phase_i"], torch_device)
    total = len(steps)
    for note, opts in runs:
        for i, step in enumerate(steps, 1):
            run_step(step, f"{name}/{note} {i}/{total} {step.label}:", sources, note, device, opts, head, costs)

    if not distributed.context().is_main:
        return {}
    tag = f"{name} report ({', '.join(notes)}):"
    out = report.report_dir(name, notes)
    if report.is_up_to_date(name, notes):
        say(f"{tag} skipped (up to date: {out / 'report.json'})")
        print((out / "ablation.md").read_text(), flush=True)
        data = read_results(out / "report.json") or {}
    else:
        say(f"{tag} started")
        t0 = time.perf_counter()
        data = report.build_report(name, notes)
        say(f"{tag} finished in {time.perf_counter() - t0:.1f} s")
    say(f"done in {time.perf_counter() - started:.1f} s; report in {out}/")
    return data
