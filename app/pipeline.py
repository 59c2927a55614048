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
CBD, TailCalib and TailCalibX on CosineCE, TailCalibX on CBD).

Every step calls its phase runner in this process with the spec its script would build.
A step whose finished outputs exist is skipped (its line says when they were made by another commit
or with a dirty tree, or with a config other than the one it would run with now: ``skip_notes``); an
interrupted training run (``last.pt`` without a finished ``results.json``) is resumed; phase II,
which has no resume, restarts an unfinished extraction. Rerunning the same command after an
interruption therefore continues where it stopped.

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
from engine.cost import approx_seconds, probe_rates, step_work
from engine.workload import Rates, Sizes, Work
from engine.methods import METHODS, SELECTING_KEYS, Arm, PhaseIIIMethod, PhaseIMethod
from engine.recorder import SPEED_SETTINGS, saved_config_differences
from utils import distributed
from utils.cli import RunSpec, VisualizeSpec
from utils.config import CONFIG_PHASES, CONFIG_ROOT, config_name, get_dotted, load_config, parse_opts
from utils.errors import UserError
from utils.provenance import changes_since, git_state
from utils.json_files import read_results
from utils.layout import RunPaths, seed_notes
from utils.run_dir import is_finished
from utils.schema import schema_keys

__all__ = ["Step", "plan_steps", "config_sources", "notes_and_opts", "route_opts", "step_opts",
           "check_existing_runs", "step_state", "skip_notes", "run"]

PREFIX = "[pipeline]"
VISUALIZE_PHASE = "phase_i"
PHASE_LABELS = {"phase_i": "phase I", "phase_ii": "phase II and visualize", "phase_iii": "phase III"}


def say(message: str) -> None:
    if distributed.first_process():  # under torchrun every rank runs the pipeline; rank 0 talks
        print(f"{PREFIX} {message}", flush=True)


@dataclass(frozen=True)
class Step:
    kind: str                    # phase_i | phase_ii | phase_iii | visualize
    label: str
    arm: Arm | None = None       # phase I / III: the arm the step trains; phase II: its backbone's phase I arm
    teacher: int = 0             # phase I: teacher k of the distilled run that follows (note <note>-teacher<k>)

    @property
    def method(self):
        return None if self.arm is None else self.arm.method

    def folder(self) -> str:
        """Run folder name under checkpoints/ (phase II: its phase name, whose outputs are in features*/)."""
        if self.kind == "phase_ii":
            return self.arm.backbone.phase_ii_folder
        return self.arm.folder if self.arm is not None else self.kind

    def note(self, note: str) -> str:
        """The note of the step's run within the chain of ``note``."""
        return f"{note}-teacher{self.teacher}" if self.teacher else note

    def config_phase(self) -> str:
        """Whose config (and --opts) the step reads: its own phase's; visualize reads phase II's."""
        return "phase_ii" if self.kind == "visualize" else self.kind


def plan_steps(suite: str = "fsa", teachers: int = 3) -> list[Step]:
    """The steps of one note: each phase I method of `suite` (CE first; a distilled one after its
    ``teachers`` teacher runs), each followed by its phase II and the suite's phase III arms on it
    (phase II always for CE, which visualize reads), then visualize."""
    arms = METHODS.suite(suite)
    backbones = [a.method for a in arms if isinstance(a.method, PhaseIMethod)]
    steps: list[Step] = []
    for backbone in backbones:
        if backbone.teacher:
            teacher = METHODS.arm(backbone.teacher)
            steps += [Step("phase_i", f"phase I {teacher.label} teacher {k}", teacher, teacher=k)
                      for k in range(1, teachers + 1)]
        on_it = [a for a in arms if isinstance(a.method, PhaseIIIMethod) and a.backbone is backbone]
        own = METHODS.arm(backbone.id)
        steps.append(Step("phase_i", "phase I" if backbone.is_baseline else f"phase I {backbone.label}", own))
        if on_it or backbone.is_baseline:
            steps.append(Step("phase_ii", "phase II" if backbone.is_baseline else f"phase II on {backbone.label}", own))
        steps += [Step("phase_iii", f"phase III {a.label}", a) for a in on_it]
    return [*steps, Step("visualize", "visualize")]


# ------------------------------------------------------------------------------------------------
# Configs, notes, data
# ------------------------------------------------------------------------------------------------
def config_sources(config: str) -> dict[str, str]:
    """What to pass as ``--config`` to each phase: the config name for a name (a phase II / III config
    that does not exist means that phase's defaults); for a path ``DIR/phase_i/NAME.yaml`` its siblings
    ``DIR/phase_ii/NAME.yaml`` and ``DIR/phase_iii/NAME.yaml`` where they exist, else the name NAME
    (whose shipped config or defaults apply). A missing phase I config is a UserError naming it."""
    if not config.endswith((".yaml", ".yml")):
        if not (CONFIG_ROOT / "phase_i" / f"{config}.yaml").is_file():
            load_config(config, "phase_i")  # its error lists the available configs
        return {phase: config for phase in CONFIG_PHASES}
    first = Path(config)
    if not first.is_file():
        raise UserError(f"--config {config}: no such file. Pass a config name (configs/phase_i/NAME.yaml) "
                        f"or the path of a phase I config whose folder is named phase_i.")
    if first.parent.name != "phase_i":
        raise UserError(
            f"--config {config}: the pipeline needs the phase I config, in a folder named phase_i. Pass a config "
            f"name, or the path DIR/phase_i/NAME.yaml of a tree whose DIR/phase_ii/NAME.yaml and "
            f"DIR/phase_iii/NAME.yaml (optional) hold the other phases' settings.")
    sources = {"phase_i": config}
    for phase in CONFIG_PHASES[1:]:
        sibling = first.parent.parent / phase / first.name
        sources[phase] = str(sibling) if sibling.is_file() else first.stem
    return sources


def notes_and_opts(note: str | None, seeds: list[int] | None) -> list[tuple[str, list[str]]]:
    """``[(note, --opts for the phases)]``: the variant's notes (``utils.layout.seed_notes``) with
    ``seed=N`` per seed."""
    notes = seed_notes(note, seeds)
    return list(zip(notes, [[f"seed={s}"] for s in seeds] if seeds else [[]]))


def _opt_key(item: str) -> str:
    return item.split("=", 1)[0].strip()


def route_opts(opts: list[str], *, seeded: bool) -> dict[str, list[str]]:
    """``--opts`` per config phase (``phase_i``, ``phase_ii``, ``phase_iii``): each ``KEY=VALUE`` goes to
    every phase whose schema has KEY (a value or a section). A key no phase knows, and a key the
    pipeline sets itself, is a UserError naming the known keys, raised before any step runs."""
    parse_opts(opts)  # the phases' own syntax checks (KEY=VALUE, YAML values), before routing by key
    known = {phase: schema_keys(phase) for phase in CONFIG_PHASES}
    routed: dict[str, list[str]] = {phase: [] for phase in CONFIG_PHASES}
    unknown = []
    for item in opts:
        key = _opt_key(item)
        # the steps append their generator last, and seed=N comes first: either would silently win
        if key == "finetune.generator":
            raise UserError("--opts finetune.generator: the pipeline runs every generator as its own phase III step "
                            "(phase_iii_<mode>-<generator>). To fine-tune with one generator only, run "
                            "phase_iii_online_train_or_test.py or phase_iii_offline_train_or_test.py with "
                            "--opts finetune.generator=NAME.")
        if key in SELECTING_KEYS or key == "backbone":
            raise UserError(f"--opts {key}: the pipeline chooses the phase I methods and the backbones of phases II and "
                            f"III itself, by --suite (each phase I method its own run, phase_i-<id>; phase III arms on "
                            f"a backbone other than CE in <folder>-on-<id>). To train one variant only, run its script "
                            f"with --opts {key}=VALUE (see engine/methods.py for the settings of each method).")
        if key == "seed" and seeded:
            raise UserError("--opts seed=...: --seeds already passes seed=N to every phase of each seed's note; "
                            "drop seed from --opts.")
        phases = [phase for phase in CONFIG_PHASES
                  if any(k == key or k.startswith(f"{key}.") for k in known[phase])]
        if not phases:
            unknown.append(key)
        for phase in phases:
            routed[phase].append(item)
    if unknown:
        listing = "; ".join(f"{PHASE_LABELS[phase]}: {', '.join(known[phase])}" for phase in CONFIG_PHASES)
        raise UserError(f"--opts {', '.join(unknown)}: no phase's config has {'this key' if len(unknown) == 1 else 'these keys'}. "
                        f"Known keys: {listing}.")
    return routed


def step_opts(step: Step, opts: dict[str, list[str]], seed: int | None = None) -> list[str]:
    """The --opts a step's script gets: those of its config phase, then what selects the step's arm
    (a phase I method's settings, a phase III method's generator, a backbone other than CE) and, for a
    teacher run, its seed (from the chain's ``seed``)."""
    selects: list[str] = []
    if step.kind in ("phase_i", "phase_iii"):
        selects = step.arm.opts(explicit=True)
    elif step.kind == "phase_ii" and not step.arm.backbone.is_baseline:
        selects = [f"backbone={step.arm.backbone.id}"]
    if step.teacher:
        from engine.phase_i import teacher_seed

        selects.append(f"seed={teacher_seed(seed or 0, step.teacher)}")
    return [*opts[step.config_phase()], *selects]


def _saved_config_path(step: Step, name: str, note: str) -> Path | None:
    """The resolved config an existing run of ``step`` saved (visualize saves none: it reads phase II's)."""
    if step.kind == "visualize":
        return None
    paths = RunPaths(step.folder(), name, step.note(note))
    return (paths.features_dir if step.kind == "phase_ii" else paths.checkpoint_dir) / "config.yaml"


def _setting(cfg: dict, key: str) -> object:
    try:
        return get_dotted(cfg, key)
    except (KeyError, TypeError):
        return "(not set)"


def check_existing_runs(steps: list[Step], sources: dict[str, str], name: str,
                        runs: list[tuple[str, dict[str, list[str]]]], user_opts: dict[str, list[str]]) -> None:
    """Refuse ``--opts`` that an existing run would ignore: a finished step is skipped, and an
    interrupted one resumes with the settings it started with, so a key the user sets to another
    value than such a run has would change nothing. A new --note runs the variant beside it."""
    conflicts = []
    for note, opts in runs:
        for step in steps:
            # speed settings may differ between runs, as between a run and its --resume
            keys = [k for k in map(_opt_key, user_opts[step.config_phase()]) if not f"{k}.".startswith(SPEED_SETTINGS)]
            saved_path = _saved_config_path(step, name, note)
            if not keys or saved_path is None or step_state(step, name, note)[0] not in ("finished", "interrupted"):
                continue
            try:
                # as the run resolved it (keys added since, e.g. determinism, take their defaults)
                saved = load_config(str(saved_path), step.config_phase(), saved=True)
            except UserError:
                continue  # the step's own run reports an unreadable config
            wanted = load_config(sources[step.config_phase()], step.config_phase(), step_opts(step, opts, _seed(sources, opts) if step.teacher else None))
            conflicts += [f"{saved_path.parent}: {key} is {_setting(saved, key)!r}, --opts asks for {_setting(wanted, key)!r}"
                          for key in keys if _setting(saved, key) != _setting(wanted, key)]
    if conflicts:
        lines = "\n  ".join(conflicts)
        raise UserError(
            f"--opts would change runs that already exist, but the pipeline does not rerun a finished step and "
            f"resumes an interrupted one only with its own settings:\n  {lines}\n"
            f"Run this variant as a new experiment beside them with --note NAME (with --seeds: --note NAME --seeds ..., "
            f"notes NAME-seedN), or drop these --opts to continue the existing runs.")


# ------------------------------------------------------------------------------------------------
# Steps
# ------------------------------------------------------------------------------------------------
def step_state(step: Step, name: str, note: str) -> tuple[str, str]:
    """``(state, where)`` with state ``finished`` | ``interrupted`` | ``stale`` | ``new``.

    ``stale``: a training run folder with an unfinished results.json but no last.pt (nothing to
    resume from), an unfinished phase II output folder, or a visualization folder without a complete
    record (PNGs of an interrupted run); all are started again from scratch."""
    note = step.note(note)
    if step.kind == "phase_ii":
        folder = RunPaths(step.folder(), name, note).features_dir
        results = read_results(folder / "results.json")
        if results and results.get("finished"):
            return "finished", str(folder / "results.json")
        return ("stale" if folder.exists() else "new"), str(folder)
    if step.kind == "visualize":
        from app import visualize  # heavy imports, only once a visualize step is looked at

        folder = visualize.output_dir(name, note, VISUALIZE_PHASE)
        if visualize.is_complete(folder):
            return "finished", str(folder / "results.json")
        return ("stale" if folder.exists() else "new"), str(folder)
    paths = RunPaths(step.folder(), name, note)
    if is_finished(paths):
        return "finished", str(paths.results)
    if paths.last.is_file():
        return "interrupted", str(paths.last)
    if paths.results.is_file():
        return "stale", str(paths.checkpoint_dir)
    return "new", str(paths.checkpoint_dir)


def _spec(step: Step, source: str, note: str, device: str, opts: list[str], *, resume: bool,
          overwrite: bool) -> RunSpec:
    """The spec the step's script would build (``opts``: ``step_opts``); visualize keeps its defaults."""
    if step.kind == "visualize":
        return VisualizeSpec(config=source, note=note, device=device, opts=tuple(opts), phase=VISUALIZE_PHASE)
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


def _seed(sources: dict[str, str], opts: dict[str, list[str]]) -> int:
    """The chain's seed: phase I's, after --seeds / --opts."""
    return load_config(sources["phase_i"], "phase_i", opts["phase_i"])["seed"]


def skip_notes(step: Step, source: str, name: str, note: str, args: list[str], results: Path,
               head: tuple[str | None, bool | None]) -> list[str]:
    """What changed since the finished step was made, for its "skipped" line: the code (its results'
    provenance against the checkout's `head`, :func:`utils.provenance.git_state`) and the settings (the
    config it saved against the one it would run with now, from `source` and `args`)."""
    notes = changes_since((read_results(results) or {}).get("provenance"), head)
    saved_path = _saved_config_path(step, name, note)
    if saved_path is None:
        return notes
    phase = step.config_phase()
    try:
        saved = load_config(str(saved_path), phase, saved=True)  # a key added since the run: its default
    except UserError:
        return notes  # a config this code no longer reads: its own run would say why
    wanted = load_config(source, phase, args)
    # a null the run resolved when it started (finetune.iterations: null) is not a change
    changed = [key for key in saved_config_differences(saved, wanted) if _setting(wanted, key) is not None]
    return notes + ([f"made with other settings than now: {', '.join(changed)}"] if changed else [])


def _run_step(step: Step, tag: str, sources: dict[str, str], note: str, device: str,
              opts: dict[str, list[str]], head: tuple[str | None, bool | None], costs: StepCosts | None, *,
              upstream: str | None = None, talk: Callable[[str], None] = say) -> None:
    """Skip, resume or start one step of ``note``'s chain and say so (``talk``); ``upstream``: the note whose
    phase I / II a phase III step reads (sweep.py's grid points; None: its own)."""
    name = config_name(sources["phase_i"])
    state, where = step_state(step, name, note)
    args = step_opts(step, opts, _seed(sources, opts) if step.teacher else None)
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
        cfg = None if step.kind == "visualize" else load_config(
            sources[step.config_phase()], step.config_phase(), step_opts(step, opts, _seed(sources, opts) if step.teacher else None))
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


def _check_configs_choose_nothing(cfgs: dict[str, dict], name: str) -> None:
    """The suite chooses the methods: a config that selects a phase I method other than CE, or a phase
    II / III backbone other than CE, would be silently overridden, so it is refused."""
    chosen = METHODS.phase_i(cfgs["phase_i"])
    if not chosen.is_baseline:
        raise UserError(f"the phase I config of '{name}' selects the phase I method {chosen.id} "
                        f"({' '.join(chosen.selecting_opts())}), but the pipeline chooses the phase I methods by --suite "
                        f"(CE first, the others each in its own run). Remove those keys from the config, or train that "
                        f"method alone: {chosen.command(name, 'NOTE')}")
    for phase in ("phase_ii", "phase_iii"):
        if not METHODS.get(cfgs[phase]["backbone"]).is_baseline:
            raise UserError(f"the {phase} config of '{name}' sets backbone: {cfgs[phase]['backbone']}, but the pipeline "
                            f"chooses each step's backbone by --suite. Remove the key, or run that phase alone with "
                            f"--opts backbone=....")


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
    _check_configs_choose_nothing(cfgs, name)
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
            _run_step(step, f"{name}/{note} {i}/{total} {step.label}:", sources, note, device, opts, head, costs)

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
