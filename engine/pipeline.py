"""The whole chain for one config in one command, resumable, then the ablation report.

    python pipeline.py --config smoke
    python pipeline.py --config cifar10-LT_resnet18 --seeds 0 1 2 --device 0

Order, for each note: phase I -> phase II -> every phase III method of the method table
(``engine.methods.METHODS``) in the chosen suite, in table order (the decoupled classifiers, each FSA
mode after its cRT control, then TailCalib and TailCalibX) -> visualize; then one report over all
notes. ``--suite fsa`` (default) leaves out the methods that re-train a classifier (LWS, cRT) and the
phase I losses other than CE; ``--suite full`` runs them too, the losses last (each its own phase I
run, ``phase_i-<loss>``; phases II and III build on the CE run).

Every step calls its phase runner in this process with the spec its script would build.
A step whose finished outputs exist is skipped; an interrupted training run (``last.pt`` without a
finished ``results.json``) is resumed; phase II, which has no resume, restarts an unfinished
extraction. Rerunning the same command after an interruption therefore continues where it stopped.

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
from dataclasses import dataclass
from pathlib import Path

import yaml

from datasets.fashion_mnist import ensure_fashion_mnist
from engine.methods import BASELINE, METHODS, SUITES, Method
from engine.recorder import SPEED_SETTINGS
from utils import distributed
from utils.cli import RunSpec, VisualizeSpec
from utils.config import CONFIG_PHASES, CONFIG_ROOT, config_name, get_dotted, load_config, parse_opts
from utils.errors import UserError
from utils.run_dir import RunPaths, check_run_name, is_finished, read_results
from utils.schema import schema_keys

__all__ = ["Step", "plan_steps", "config_sources", "notes_and_opts", "route_opts", "step_opts",
           "check_existing_runs", "step_state", "run"]

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
    method: Method | None = None  # phase I and III: the method-table entry the step trains

    def folder(self) -> str:
        """Run folder name under checkpoints/ (phase II: features/, visualize: visualizations/)."""
        return self.method.folder if self.method is not None else self.kind

    def config_phase(self) -> str:
        """Whose config (and --opts) the step reads: its own phase's; visualize reads phase II's."""
        return "phase_ii" if self.kind == "visualize" else self.kind


def plan_steps(suite: str = "fsa") -> list[Step]:
    """The steps of one note: phase I, phase II, every phase III method of `suite` in table order, visualize."""
    if suite not in SUITES:
        raise UserError(f"--suite {suite}: choose one of {', '.join(SUITES)}.")
    steps = [Step("phase_i", "phase I", METHODS.get(BASELINE)), Step("phase_ii", "phase II")]
    steps += [Step("phase_iii", f"phase III {m.label}", m) for m in METHODS.stage("phase_iii") if suite in m.suites]
    # the other phase I losses after the chain that builds on the CE backbone
    steps += [Step("phase_i", f"phase I {m.label}", m) for m in METHODS.stage("phase_i")
              if m.id != BASELINE and suite in m.suites]
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
    """``[(note, --opts for the phases)]``: one note, or ``seedN`` (``NOTE-seedN`` with a note) with
    ``seed=N`` per seed."""
    if seeds:
        if len(set(seeds)) != len(seeds):
            raise UserError(f"--seeds {' '.join(map(str, seeds))}: each seed once, please.")
        if any(s < 0 for s in seeds):
            raise UserError(f"--seeds {' '.join(map(str, seeds))}: seeds must be >= 0.")
        prefix = "" if note is None else f"{note}-"
        return [(check_run_name(f"{prefix}seed{s}", "--note"), [f"seed={s}"]) for s in seeds]
    return [(check_run_name("default" if note is None else note, "--note"), [])]


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
        if key == "train.loss":
            raise UserError("--opts train.loss: phases II and III build on the CE phase I run, and --suite full runs "
                            "every other loss as its own phase I step (phase_i-<loss>). To train one loss only, run "
                            "phase_i_train_or_test.py --opts train.loss=NAME.")
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


def step_opts(step: Step, opts: dict[str, list[str]]) -> list[str]:
    """The --opts a step's script gets: those of its config phase, then what selects the step's method
    (a phase III step's generator, a phase I variant's loss)."""
    method = step.method
    selects = []
    if step.kind == "phase_iii":
        selects = [f"finetune.generator={method.generator}"]
    elif step.kind == "phase_i" and method.id != BASELINE:
        selects = [f"train.loss={method.loss}"]
    return [*opts[step.config_phase()], *selects]


def _saved_config_path(step: Step, name: str, note: str) -> Path | None:
    """The resolved config an existing run of ``step`` saved (visualize saves none: it reads phase II's)."""
    if step.kind == "visualize":
        return None
    paths = RunPaths(step.folder(), name, note)
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
                saved = yaml.safe_load(saved_path.read_text())
            except (OSError, yaml.YAMLError):
                continue  # the step's own run reports an unreadable config
            if not isinstance(saved, dict):
                continue
            wanted = load_config(sources[step.config_phase()], step.config_phase(), step_opts(step, opts))
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
    if step.kind == "phase_ii":
        folder = RunPaths("phase_ii", name, note).features_dir
        results = read_results(folder / "results.json")
        if results and results.get("finished"):
            return "finished", str(folder / "results.json")
        return ("stale" if folder.exists() else "new"), str(folder)
    if step.kind == "visualize":
        from engine import visualize  # heavy imports, only once a visualize step is looked at

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
    from engine import visualize

    return visualize.run(spec)


def _run_step(step: Step, tag: str, sources: dict[str, str], note: str, device: str,
              opts: dict[str, list[str]]) -> None:
    name = config_name(sources["phase_i"])
    state, where = step_state(step, name, note)
    if state == "finished":
        say(f"{tag} skipped (finished: {where})")
        return
    resume = state == "interrupted"
    overwrite = state == "stale" and step.kind != "visualize"
    args = step_opts(step, opts)
    with_opts = f" with --opts {shlex.join(args)}" if args else ""
    if resume:
        say(f"{tag} resumed from {where}{with_opts}")
    elif state == "stale":
        say(f"{tag} started again from scratch{with_opts} (unfinished, nothing to resume: {where})")
    else:
        say(f"{tag} started{with_opts}")
    spec = _spec(step, sources[step.config_phase()], note, device, args, resume=resume, overwrite=overwrite)
    started = time.perf_counter()
    try:
        _call(step, spec)
        distributed.barrier()  # every rank sees the step's finished outputs before the next step's check
    except UserError:
        say(f"{tag} failed after {time.perf_counter() - started:.1f} s")
        raise
    except KeyboardInterrupt:
        say(f"{tag} interrupted after {time.perf_counter() - started:.1f} s")
        raise
    say(f"{tag} finished in {time.perf_counter() - started:.1f} s")


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
    distributed.setup_device(device)  # under torchrun: join the process group once, for every step
    # check every config (and the --opts) before the first hour of training
    cfgs = {phase: load_config(sources[phase], phase, runs[0][1][phase]) for phase in CONFIG_PHASES}
    for phase in ("phase_i", "phase_iii"):
        if cfgs[phase]["phase"] != "train":
            raise UserError(f"the {phase} config of '{name}' sets phase: {cfgs[phase]['phase']}, but the pipeline trains. "
                            f"Test a checkpoint with the phase's own script instead.")
    steps = plan_steps(spec.suite)
    check_existing_runs(steps, sources, name, runs, user_opts)
    notes = [note for note, _ in runs]
    say(f"config '{name}', note(s) {', '.join(notes)}, device {device}, suite {spec.suite}: "
        f"{' -> '.join(s.label for s in steps)} -> report")
    if any(user_opts.values()):
        say("--opts: " + "; ".join(f"{PHASE_LABELS[phase]}: {shlex.join(user_opts[phase]) or '(none)'}"
                                    for phase in CONFIG_PHASES))

    started = time.perf_counter()
    data_checked = False
    total = len(steps)
    for note, opts in runs:
        for i, step in enumerate(steps, 1):
            if step.kind == "phase_i" and not data_checked:
                distributed.on_main(lambda: ensure_fashion_mnist(cfgs["phase_i"]["dataset"], say))
                distributed.barrier()
                data_checked = True
            _run_step(step, f"{name}/{note} {i}/{total} {step.label}:", sources, note, device, opts)

    if not distributed.context().is_main:
        return {}
    tag = f"{name} report ({', '.join(notes)}):"
    out = report.report_dir(name)
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
