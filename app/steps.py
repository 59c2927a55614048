"""The steps of a chain and what each one gets, shared by pipeline.py and sweep.py: the steps of a suite
(:func:`plan_steps`), the config each phase reads (:func:`config_sources`), the notes of --seeds with their
``seed=N``, the routing of ``--opts KEY=VALUE`` to every phase whose config schema has KEY (visualize reads
phase II's; a key no phase knows, or one the pipeline sets itself, is refused before any step runs:
:func:`route_opts`), the --opts of one step's script (:func:`step_opts`: the phase's, then what selects the
step's arm), where a step's run stands on disk (:func:`step_state`), and the comparisons of the settings
asked for now with those an existing run saved: refused when the run would ignore them
(:func:`check_existing_runs`, since a finished step is skipped and an interrupted one resumes with its own
settings: a variant is a new ``--note``), noted on its "skipped" line otherwise (:func:`skip_notes`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from engine.methods import METHODS, SELECTING_KEYS, Arm, PhaseIIIMethod, PhaseIMethod
from engine.recorder import SPEED_SETTINGS, saved_config_differences
from utils.config import CONFIG_PHASES, CONFIG_ROOT, get_dotted, load_config, parse_opts
from utils.errors import UserError
from utils.json_files import read_results
from utils.layout import RunPaths, seed_notes
from utils.provenance import changes_since
from utils.run_dir import is_finished
from utils.schema import schema_keys

__all__ = ["Step", "plan_steps", "phase_i_steps", "config_sources", "notes_and_opts", "route_opts", "step_opts",
           "chain_seed", "check_existing_runs", "check_configs_choose_nothing", "step_state", "skip_notes"]

VISUALIZE_RUN = "phase_i"  # the run visualize explains in the pipeline
PHASE_LABELS = {"phase_i": "phase I", "phase_ii": "phase II and visualize", "phase_iii": "phase III"}


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


def phase_i_steps(arm: Arm, teachers: int) -> list[Step]:
    """The phase I steps that make a phase I arm's run: a distilled method's ``teachers`` teacher runs
    first, then its own."""
    steps = []
    if arm.method.teacher:
        teacher = METHODS.arm(arm.method.teacher)
        steps += [Step("phase_i", f"phase I {teacher.label} teacher {k}", teacher, teacher=k)
                  for k in range(1, teachers + 1)]
    return steps + [Step("phase_i", "phase I" if arm.backbone.is_baseline else f"phase I {arm.label}", arm)]


def plan_steps(suite: str = "fsa", teachers: int = 3) -> list[Step]:
    """The steps of one note: each phase I method of `suite` (CE first; a distilled one after its
    ``teachers`` teacher runs), each followed by its phase II and the suite's phase III arms on it
    (phase II always for CE, which visualize reads), then visualize."""
    arms = METHODS.suite(suite)
    backbones = [a.method for a in arms if isinstance(a.method, PhaseIMethod)]
    steps: list[Step] = []
    for backbone in backbones:
        own = METHODS.arm(backbone.id)
        steps += phase_i_steps(own, teachers)
        on_it = [a for a in arms if isinstance(a.method, PhaseIIIMethod) and a.backbone is backbone]
        if on_it or backbone.is_baseline:
            steps.append(Step("phase_ii", "phase II" if backbone.is_baseline else f"phase II on {backbone.label}", own))
        steps += [Step("phase_iii", f"phase III {a.label}", a) for a in on_it]
    return [*steps, Step("visualize", "visualize")]


# ------------------------------------------------------------------------------------------------
# Configs, notes, --opts
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
                            f"with --opts {key}=VALUE (see engine/methods/ for the settings of each method).")
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


def chain_seed(sources: dict[str, str], opts: dict[str, list[str]]) -> int:
    """The chain's seed, which a teacher run's seed derives from: phase I's, after --seeds / --opts."""
    return load_config(sources["phase_i"], "phase_i", opts["phase_i"])["seed"]


# ------------------------------------------------------------------------------------------------
# Existing runs
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

        folder = visualize.output_dir(name, note, VISUALIZE_RUN)
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
            seed = chain_seed(sources, opts) if step.teacher else None
            wanted = load_config(sources[step.config_phase()], step.config_phase(), step_opts(step, opts, seed))
            conflicts += [f"{saved_path.parent}: {key} is {_setting(saved, key)!r}, --opts asks for {_setting(wanted, key)!r}"
                          for key in keys if _setting(saved, key) != _setting(wanted, key)]
    if conflicts:
        lines = "\n  ".join(conflicts)
        raise UserError(
            f"--opts would change runs that already exist, but the pipeline does not rerun a finished step and "
            f"resumes an interrupted one only with its own settings:\n  {lines}\n"
            f"Run this variant as a new experiment beside them with --note NAME (with --seeds: --note NAME --seeds ..., "
            f"notes NAME-seedN), or drop these --opts to continue the existing runs.")


def check_configs_choose_nothing(cfgs: dict[str, dict], name: str) -> None:
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
