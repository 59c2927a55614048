"""Grad-CAM heatmap overlays and class-specific / class-generic masks as PNG grids.

    python visualize.py --config cifar10-LT_resnet18 --device 0
    python visualize.py --config smoke --classes 3 5 --samples 6 --phase phase_iii_offline-none

For each chosen class (default: the tail classes and their confusing classes from phase II's
confusion.json, else the tail classes), writes one PNG with a row per sample:
image | Grad-CAM overlay | class-specific mask (M >= ts) | class-generic mask (M < tg), to
visualizations/<config>/<note>/<phase>/ (then results.json there, listing them, once all are written),
and the same images to TensorBoard (run_summary/visualize/<config>/<note>/). ts / tg come from
configs/phase_ii/<config>.yaml (or --opts). Dataset and model settings come from the phase I run of the
same config and note; the default classes only from phase II outputs made from that phase I checkpoint.
--phase names any run folder of the config and note (phase_i or phase_iii_*) except TailCalib /
TailCalibX ones, whose checkpoint is a classifier on pooled features of phase I's frozen backbone.
"""
from utils.cli import VisualizeSpec, phase_parser, run_cli
from utils.errors import UserError

# Bounds of the size flags, checked before any work: a class's grid is samples x (4 panels) of panel^2 RGB
# pixels, rendered in memory (32 samples of 1024-pixel panels: 400 MB), and every chosen image goes through one
# batched Grad-CAM call.
PANEL_RANGE = (32, 1024)   # pixels per square panel
SAMPLES_RANGE = (1, 32)    # samples per class
MAX_CLASSES = 64           # --classes C [C ...] count


def main() -> None:
    parser = phase_parser(__doc__, training=False)
    parser.add_argument("--phase", dest="run_name", default=VisualizeSpec.run_name,
                        help="run folder whose best_model.pt to explain: checkpoints/<phase>/<config>/<note>/, "
                             "phase_i (default) or phase_iii_* (e.g. phase_iii_online, phase_iii_offline-none)")
    parser.add_argument("--checkpoint", help="explain this checkpoint instead (same payload format as phase I); "
                                             "--phase then only names the output folder")
    parser.add_argument("--classes", type=int, nargs="+", metavar="C",
                        help=f"class indices, at most {MAX_CLASSES} (default: tail classes and their confusing classes)")
    parser.add_argument("--samples", type=int, default=VisualizeSpec.samples,
                        help=f"samples per class, {SAMPLES_RANGE[0]}..{SAMPLES_RANGE[1]} (default {VisualizeSpec.samples})")
    parser.add_argument("--layer", help="Grad-CAM layer (any module name; default gradcam.layer, i.e. the CAM layer)")
    parser.add_argument("--split", default=VisualizeSpec.split, choices=("train", "test"), help="which images (default train)")
    parser.add_argument("--panel", type=int, default=VisualizeSpec.panel,
                        help=f"panel size in pixels, {PANEL_RANGE[0]}..{PANEL_RANGE[1]} (default {VisualizeSpec.panel})")
    run(VisualizeSpec.from_args(parser.parse_args()))


def check_sizes(spec: VisualizeSpec) -> None:
    """UserError unless --panel, --samples and the --classes count lie in their ranges (see --help)."""
    for flag, value, (low, high) in (("--panel", spec.panel, PANEL_RANGE), ("--samples", spec.samples, SAMPLES_RANGE)):
        if not low <= value <= high:
            raise UserError(f"{flag} must lie in {low}..{high}, got {value}.")
    if spec.classes is not None and len(spec.classes) > MAX_CLASSES:
        raise UserError(f"--classes takes at most {MAX_CLASSES} classes per run, got {len(spec.classes)}: pass fewer "
                        f"(and run again for the others).")


def run(spec: VisualizeSpec) -> list:
    check_sizes(spec)
    from app.visualize import run as write_visualizations  # heavy imports only after parsing and checking

    return write_visualizations(spec)


if __name__ == "__main__":
    run_cli(main)
