"""visualize.py's work: Grad-CAM overlays and class-specific / class-generic masks as PNG grids.

One batched Grad-CAM call for every chosen sample; rendering is in fsa/visualization.py.
After the last PNG, ``results.json`` in the output folder records the run (``finished: true`` and the
PNGs written); the pipeline counts the step as done only when that record and all its PNGs exist.
"""
from __future__ import annotations

import re
from pathlib import Path

import cv2
import torch

from datasets.file_list import IMAGENET_MEAN, IMAGENET_STD
from engine.artifacts import open_phase_i_run
from engine.phase_ii_outputs import check_provenance, explained_classes, phase_ii_paths
from engine.methods import BASELINE, METHODS, PhaseIIIMethod
from fsa.class_split import head_tail_split
from fsa.gradcam import CamExtractor
from models.base import eval_mode
from fsa.visualization import render_grid, to_display_images
from utils.cli import VisualizeSpec
from utils.config import config_name, load_config
from utils import distributed
from utils.device import resolve_device
from utils.errors import UserError
from utils.json_files import read_results, write_json_atomic
from utils.layout import RESULTS_FILE, VISUALIZE, Layout, RunPaths, check_run_name
from utils.logging import open_summary_writer, setup_logger
from utils.provenance import begin_run, collect


def output_dir(config: str, note: str, run_name: str) -> Path:
    """Where the PNGs of (config, note) explaining run ``run_name``'s model go."""
    return RunPaths(run_name, config, note).visualization_dir


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` holds a finished visualize run: a ``results.json`` with ``finished: true``
    listing PNGs that all exist (a stray PNG from an interrupted run does not count)."""
    record = read_results(Path(folder) / RESULTS_FILE)
    if not isinstance(record, dict) or record.get("finished") is not True:
        return False
    pngs = record.get("pngs")
    return (isinstance(pngs, list) and bool(pngs)
            and all(isinstance(name, str) and (Path(folder) / name).is_file() for name in pngs))


def run_folders(config: str, note: str) -> list[str]:
    """The run names ``--phase`` can name for (config, note): every phase I and phase III run with a
    ``<config>/<note>/`` folder, sorted (``phase_i`` first)."""
    return [run_name for run_name, _ in Layout().runs(config, note)]


def explained_checkpoint(run_name: str, config: str, note: str) -> tuple[Path, str]:
    """``(best_model.pt of run run_name, the command that writes it)``. A UserError lists the runs that
    exist when ``run_name`` is none of them, and explains TailCalib runs, which hold no backbone."""
    existing = run_folders(config, note)
    # without the baseline's phase I run, open_phase_i_run names the command that makes it
    if run_name not in existing and run_name != METHODS.get(BASELINE).folder:
        raise UserError(f"--phase {run_name}: there is no run folder checkpoints/{run_name}/{config}/{note}/. Run folders "
                        f"of config '{config}', note '{note}': {', '.join(existing) or '(none)'}.")
    best = RunPaths(run_name, config, note).best
    arm = METHODS.by_folder(run_name)
    if arm is None:
        return best, f"the run of checkpoints/{run_name}"
    if isinstance(arm.method, PhaseIIIMethod) and not arm.method.holds_backbone:  # a phase I run is a backbone
        raise UserError(
            f"--phase {run_name}: a {arm.label} run's checkpoint holds a classifier on transformed pooled "
            f"features of phase I's frozen backbone, not backbone weights, so it has no feature maps of its own to "
            f"explain. Its backbone is phase I's: --phase {arm.backbone.folder} shows that backbone's Grad-CAMs (with "
            f"phase I's classifier).")
    return best, arm.command(config, note)


def _default_classes(features_dir: Path, bundle, hr: float, phase_i_checkpoint: Path,
                     phase_i_config: Path) -> tuple[list[int], str]:
    path = features_dir / "confusion.json"
    if path.is_file():
        # the same checks phase III makes: confusing classes of another phase I model would mislead
        try:
            check_provenance(features_dir, phase_i_checkpoint, phase_i_config)
            chosen = explained_classes(features_dir, bundle.num_classes)
        except UserError as exc:
            raise UserError(f"{str(exc).rstrip('.')}; or pass --classes C [C ...] to choose the classes yourself "
                            f"(the default ones come from {path}).") from exc
        if chosen:
            return chosen, f"tail classes and their confusing classes from {path}"
    _, tail = head_tail_split(bundle.train_counts, hr)
    return tail, f"tail classes of the training counts (phase I's eval.hr={hr})"


def run(spec: VisualizeSpec) -> list[Path]:
    """Write the PNG grids (and TensorBoard images) that `visualize.py` promises; returns the PNG paths.
    `spec`'s size flags are in range (visualize.check_sizes checks what users type; the pipeline passes
    the defaults)."""
    name, note = config_name(spec.config), spec.note
    run_name = spec.run_name  # --phase names the run whose model is explained
    cfg = load_config(spec.config, "phase_ii", list(spec.opts))  # ts / tg / layer; defaults without a file
    if spec.checkpoint:
        check_run_name(run_name, "--phase")  # with --checkpoint it only names the output folder
        ckpt, produced_by = Path(spec.checkpoint), "a phase I run or a phase III fsa / none run (best_model.pt)"
    else:
        ckpt, produced_by = explained_checkpoint(run_name, name, note)
    if not distributed.first_process():  # a handful of images: rank 0 of a torchrun job draws them alone
        return []
    ts, tg = cfg["split"]["ts"], cfg["split"]["tg"]
    logger = setup_logger(None, "fsa_lt.visualize")
    device = resolve_device(spec.device)
    begin_run(cfg)
    arm = METHODS.by_folder(run_name)  # the explained run's backbone: its phase I run and phase II outputs
    backbone = arm.backbone.id if arm is not None else cfg["backbone"]
    p1 = open_phase_i_run(name, note, needed_by="visualize.py", backbone=backbone)
    bundle = p1.bundle
    model = p1.load_model(device, ckpt, produced_by)
    model.eval()

    num_classes = bundle.num_classes
    if spec.classes:
        bad = [c for c in spec.classes if not 0 <= c < num_classes]
        if bad:
            raise UserError(f"--classes {bad}: class indices must lie in [0, {num_classes - 1}] "
                            f"({', '.join(f'{i}={n}' for i, n in enumerate(bundle.class_names))}).")
        classes, why = list(dict.fromkeys(spec.classes)), "--classes"
    else:
        # the phase I checkpoint behind the explained model: the loaded one, or the one phase III fine-tunes
        phase_i_checkpoint = ckpt if run_name == p1.paths.run_name else p1.paths.best
        classes, why = _default_classes(phase_ii_paths(name, note, backbone).features_dir, bundle, p1.hr,
                                        phase_i_checkpoint, p1.config_path)
    if not classes:
        raise UserError("no class to show (no tail class with phase I's eval.hr); pass --classes C [C ...].")
    logger.info(f"classes {classes} ({why}); {spec.samples} samples each from the {spec.split} set")

    dataset = (bundle.train if spec.split == "train" else bundle.test).with_augment(False)
    generator = torch.Generator().manual_seed(int(cfg["seed"]))
    picks: list[torch.Tensor] = []
    for c in classes:
        pool = torch.nonzero(dataset.targets == c).flatten()
        if len(pool) == 0:
            raise UserError(f"class {c} ({bundle.class_names[c]}) has no {spec.split} sample.")
        picks.append(pool[torch.randperm(len(pool), generator=generator)[: spec.samples]].sort().values)
    idx = torch.cat(picks)
    if hasattr(dataset, "get_batch"):
        x = dataset.get_batch(idx, device)
    else:
        x = torch.stack([dataset[int(i)][0] for i in idx]).to(device)
    y = dataset.targets[idx].to(device)

    # --layer overrides the config's layer and lets "auto" pick the method for it
    extractor = CamExtractor(model, spec.layer or cfg["gradcam"]["layer"],
                             "auto" if spec.layer else cfg["gradcam"]["method"])
    cams = extractor.layer_cams(x, y).cpu()  # one batched call for every sample
    with torch.no_grad(), eval_mode(model):
        pred = model(x).argmax(1).cpu()
    # in-memory datasets carry their normalisation; file datasets use the ImageNet one
    images = to_display_images(x, getattr(dataset, "mean", IMAGENET_MEAN), getattr(dataset, "std", IMAGENET_STD))

    layer_name = extractor.layer
    out_dir = output_dir(name, note, run_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_FILE).unlink(missing_ok=True)  # an interrupted rerun must not look complete
    summary_dir = RunPaths(VISUALIZE, name, note).summary_dir
    writer = open_summary_writer(summary_dir)
    suffix = "" if layer_name == model.cam_layer else f"_{re.sub(r'[^A-Za-z0-9.-]+', '-', layer_name)}"
    written = []
    start = 0
    try:
        for c, chosen in zip(classes, picks):
            sl = slice(start, start + len(chosen))
            start += len(chosen)
            cname = bundle.class_names[c]
            titles = [f"{c}:{cname} #{int(i)}" for i in chosen]
            subtitles = [f"pred {bundle.class_names[int(p)]}" for p in pred[sl]]
            grid = render_grid(images[sl], cams[sl], ts, tg, panel=spec.panel, titles=titles, subtitles=subtitles)
            stem = f"{spec.split}_class{c:03d}_{re.sub(r'[^A-Za-z0-9.-]+', '-', cname)}{suffix}"
            path = out_dir / f"{stem}.png"
            if not cv2.imwrite(str(path), grid):
                raise UserError(f"could not write {path}.")
            writer.add_image(f"{run_name}/{stem}", grid[..., ::-1].copy(), 0, dataformats="HWC")
            written.append(path)
    finally:
        writer.close()
    write_json_atomic(out_dir / RESULTS_FILE, {  # written last: it marks a complete run
        "finished": True, "phase": run_name, "config": name, "note": note, "checkpoint": str(ckpt),
        "classes": classes, "split": spec.split, "layer": layer_name, "pngs": [p.name for p in written],
        "provenance": collect()})
    logger.info(f"Grad-CAM layer {layer_name}, ts={ts} tg={tg}, checkpoint {ckpt}: wrote {len(written)} PNG(s) "
                f"to {out_dir} and TensorBoard images to {summary_dir}")
    return written
