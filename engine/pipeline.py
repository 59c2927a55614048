"""The whole chain for one config in one command, resumable, then the ablation report.

    python pipeline.py --config smoke
    python pipeline.py --config cifar10-LT_resnet18 --seeds 0 1 2 --device 0

Order, for each note: phase I -> phase II -> phase III online (fsa) -> phase III offline (fsa) ->
phase III offline (none, the cRT control) -> phase III offline (tailcalib) -> phase III online
(tailcalibx) -> visualize; then one report over all notes. The TailCalib steps run only where
``engine.phase_iii.available_generators()`` offers those generators.

Every step calls its phase runner in this process with the arguments its script would build.
A step whose finished outputs exist is skipped; an interrupted training run (``last.pt`` without a
finished ``results.json``) is resumed; phase II, which has no resume, restarts an unfinished
extraction. Rerunning the same command after an interruption therefore continues where it stopped.

``--seeds 0 1 2`` runs the chain for notes ``seed0 seed1 seed2`` with ``seed=N`` passed as
``--opts`` to phases I, II and III (and visualize); the long-tailed training subset is chosen by
``dataset.subset_seed``, which stays as configured, so every seed trains on the same subset.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from utils import distributed
from utils.config import CONFIG_PHASES, CONFIG_ROOT, config_name, load_config
from utils.errors import UserError
from utils.run_dir import RunPaths, check_run_name, is_finished, read_results

__all__ = ["PHASE_III_STEPS", "Step", "plan_steps", "config_sources", "notes_and_opts", "ensure_fashion_mnist",
           "step_state", "run"]

PREFIX = "[pipeline]"
# (mode, generator, label); optional generators are only run where phase III offers them
PHASE_III_STEPS: tuple[tuple[str, str, str], ...] = (
    ("online", "fsa", "phase III online (fsa)"),
    ("offline", "fsa", "phase III offline (fsa)"),
    ("offline", "none", "phase III offline (none: cRT control)"),
    ("offline", "tailcalib", "phase III offline (tailcalib)"),
    ("online", "tailcalibx", "phase III online (tailcalibx)"),
)
REQUIRED_GENERATORS = ("fsa", "none")
VISUALIZE_PHASE = "phase_i"


def say(message: str) -> None:
    if distributed.first_process():  # under torchrun every rank runs the pipeline; rank 0 talks
        print(f"{PREFIX} {message}", flush=True)


@dataclass(frozen=True)
class Step:
    kind: str                   # phase_i | phase_ii | phase_iii | visualize
    label: str
    mode: str | None = None     # phase III: online | offline
    generator: str | None = None

    def folder(self) -> str:
        """Run folder name under checkpoints/ (phase II: features/, visualize: visualizations/)."""
        if self.kind == "phase_iii":
            from engine.phase_iii import phase_name

            return phase_name(self.mode, self.generator)
        return self.kind


def plan_steps(available: list[str]) -> tuple[list[Step], list[str]]:
    """The steps of one note, and the lines explaining each phase III step left out."""
    missing = [g for g in REQUIRED_GENERATORS if g not in available]
    if missing:
        raise UserError(f"phase III does not offer the generator(s) {', '.join(missing)} the pipeline needs "
                        f"(available: {', '.join(available)}).")
    steps = [Step("phase_i", "phase I"), Step("phase_ii", "phase II")]
    left_out = []
    for mode, generator, label in PHASE_III_STEPS:
        if generator in available:
            steps.append(Step("phase_iii", label, mode, generator))
        else:
            left_out.append(f"{label}: not run, generator '{generator}' is not available in this version "
                            f"(available: {', '.join(available)})")
    steps.append(Step("visualize", "visualize"))
    return steps, left_out


# ------------------------------------------------------------------------------------------------
# Configs, notes, data
# ------------------------------------------------------------------------------------------------
def config_sources(config: str) -> dict[str, str]:
    """What to pass as ``--config`` to each phase: the shipped ``configs/<phase>/NAME.yaml`` for a
    name; for a path ``DIR/phase_i/NAME.yaml`` its siblings ``DIR/phase_ii/NAME.yaml`` and
    ``DIR/phase_iii/NAME.yaml``. A missing file is a UserError naming it."""
    if config.endswith((".yaml", ".yml")):
        first = Path(config)
        if not first.is_file():
            raise UserError(f"--config {config}: no such file. Pass a config name (configs/<phase>/NAME.yaml) "
                            f"or the path of a phase I config whose folder is named phase_i.")
        if first.parent.name != "phase_i":
            raise UserError(
                f"--config {config}: the pipeline needs one config per phase. Pass a config name, or the path "
                f"DIR/phase_i/NAME.yaml of a tree that also holds DIR/phase_ii/NAME.yaml and DIR/phase_iii/NAME.yaml.")
        files = {phase: first.parent.parent / phase / first.name for phase in CONFIG_PHASES}
        display = {phase: str(path) for phase, path in files.items()}
    else:
        files = {phase: CONFIG_ROOT / phase / f"{config}.yaml" for phase in CONFIG_PHASES}
        display = {phase: f"configs/{phase}/{config}.yaml" for phase in CONFIG_PHASES}
    missing = [phase for phase in CONFIG_PHASES if not files[phase].is_file()]
    if missing:
        names = " and ".join(display[p] for p in missing)
        raise UserError(
            f"the pipeline runs phases I, II and III with the same config name, but {names} "
            f"{'is' if len(missing) == 1 else 'are'} missing. Create {'it' if len(missing) == 1 else 'them'} "
            f"(a phase II / III config holds only that phase's settings; copy configs/phase_ii/smoke.yaml or "
            f"configs/phase_iii/smoke.yaml as a start) or run the phases one by one."
        )
    if config.endswith((".yaml", ".yml")):
        return {phase: str(path) for phase, path in files.items()}
    return {phase: config for phase in CONFIG_PHASES}


def notes_and_opts(note: str | None, seeds: list[int] | None) -> list[tuple[str, list[str]]]:
    """``[(note, --opts for the phases)]``: one note, or ``seedN`` with ``seed=N`` per seed."""
    if seeds:
        if len(set(seeds)) != len(seeds):
            raise UserError(f"--seeds {' '.join(map(str, seeds))}: each seed once, please.")
        if any(s < 0 for s in seeds):
            raise UserError(f"--seeds {' '.join(map(str, seeds))}: seeds must be >= 0.")
        return [(f"seed{s}", [f"seed={s}"]) for s in seeds]
    return [(check_run_name("default" if note is None else note, "--note"), [])]


def ensure_fashion_mnist(dataset_cfg: dict) -> None:
    """Data step: Fashion-MNIST from Debian's package when its IDX files are nowhere to be found.

    Uses the dataset's own search (``find_fashion_mnist``). Installs ``dataset-fashion-mnist`` with
    apt-get only where apt-get exists and we are root; otherwise (or if that fails) the dataset
    falls back to its torchvision download or its own clear error."""
    if dataset_cfg.get("name") != "fashion-mnist-LT":
        return
    from datasets.fashion_mnist import find_fashion_mnist

    root = dataset_cfg.get("root")
    if find_fashion_mnist(root) is not None:
        return
    apt = shutil.which("apt-get")
    is_root = getattr(os, "geteuid", lambda: -1)() == 0
    if apt is None or not is_root:
        why = "apt-get is not available" if apt is None else "not running as root"
        say(f"data: Fashion-MNIST IDX files not found and {why}; the dataset will try its own download")
        return
    say("data: Fashion-MNIST IDX files not found; installing Debian's dataset-fashion-mnist (apt-get)")
    started = time.perf_counter()
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in ([apt, "update"], [apt, "install", "-y", "dataset-fashion-mnist"]):
        proc = subprocess.run(command, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            say(f"data: '{' '.join(command[1:])}' failed ({tail[0]}); the dataset will try its own download")
            return
    found = find_fashion_mnist(root) is not None
    say(f"data: dataset-fashion-mnist installed in {time.perf_counter() - started:.1f} s"
        + ("" if found else "; IDX files still not found, the dataset will try its own download"))


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


def _namespace(step: Step, source: str, note: str, device: str, opts: list[str], *, resume: bool,
               overwrite: bool) -> argparse.Namespace:
    """The arguments the step's script would parse (see the scripts' parsers)."""
    common = dict(config=source, device=device, note=note, opts=list(opts))
    if step.kind == "phase_i":
        return argparse.Namespace(**common, resume=resume, overwrite=overwrite, checkpoint=None)
    if step.kind == "phase_ii":
        return argparse.Namespace(**common, overwrite=overwrite, checkpoint=None)
    if step.kind == "phase_iii":
        common["opts"].append(f"finetune.generator={step.generator}")
        return argparse.Namespace(**common, resume=resume, overwrite=overwrite, checkpoint=None)
    return argparse.Namespace(**common, phase=VISUALIZE_PHASE, checkpoint=None, classes=None, samples=4, layer=None,
                              split="train", panel=128)


def _call(step: Step, ns: argparse.Namespace):
    if step.kind == "phase_i":
        from engine import phase_i

        return phase_i.run(ns)
    if step.kind == "phase_ii":
        from engine import phase_ii

        return phase_ii.run(ns)
    if step.kind == "phase_iii":
        from engine import phase_iii

        return phase_iii.run(ns, step.mode)
    from engine import visualize

    return visualize.run(ns)


def _run_step(step: Step, tag: str, sources: dict[str, str], note: str, device: str, opts: list[str]) -> None:
    name = config_name(sources["phase_i"])
    state, where = step_state(step, name, note)
    if state == "finished":
        say(f"{tag} skipped (finished: {where})")
        return
    resume = state == "interrupted"
    overwrite = state == "stale" and step.kind != "visualize"
    if resume:
        say(f"{tag} resumed from {where}")
    elif state == "stale":
        say(f"{tag} started again from scratch (unfinished, nothing to resume: {where})")
    else:
        say(f"{tag} started")
    source = sources["phase_ii"] if step.kind == "visualize" else sources[step.kind]
    ns = _namespace(step, source, note, device, opts, resume=resume, overwrite=overwrite)
    started = time.perf_counter()
    try:
        _call(step, ns)
        distributed.barrier()  # every rank sees the step's finished outputs before the next step's check
    except UserError:
        say(f"{tag} failed after {time.perf_counter() - started:.1f} s")
        raise
    except KeyboardInterrupt:
        say(f"{tag} interrupted after {time.perf_counter() - started:.1f} s")
        raise
    say(f"{tag} finished in {time.perf_counter() - started:.1f} s")


def run(args: argparse.Namespace) -> dict:
    """Run the chain for every note of ``args`` (config, note, seeds, device), then the report."""
    from engine import report
    from engine.phase_iii import available_generators

    sources = config_sources(args.config)
    name = config_name(sources["phase_i"])
    runs = notes_and_opts(getattr(args, "note", None), getattr(args, "seeds", None))
    device = getattr(args, "device", "auto") or "auto"
    distributed.setup_device(device)  # under torchrun: join the process group once, for every step
    # check every config (and the --opts the pipeline adds) before the first hour of training
    phase_i_cfg = load_config(sources["phase_i"], "phase_i", runs[0][1])
    phase_iii_cfg = load_config(sources["phase_iii"], "phase_iii", runs[0][1])
    load_config(sources["phase_ii"], "phase_ii", runs[0][1])
    for phase, cfg in (("phase_i", phase_i_cfg), ("phase_iii", phase_iii_cfg)):
        if cfg["phase"] != "train":
            raise UserError(f"the {phase} config of '{name}' sets phase: {cfg['phase']}, but the pipeline trains. "
                            f"Test a checkpoint with the phase's own script instead.")
    steps, left_out = plan_steps(available_generators())
    notes = [note for note, _ in runs]
    say(f"config '{name}', note(s) {', '.join(notes)}, device {device}: "
        f"{' -> '.join(s.label for s in steps)} -> report")
    for line in left_out:
        say(line)

    started = time.perf_counter()
    data_checked = False
    total = len(steps)
    for note, opts in runs:
        for i, step in enumerate(steps, 1):
            if step.kind == "phase_i" and not data_checked:
                distributed.on_main(lambda: ensure_fashion_mnist(phase_i_cfg["dataset"]))
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
