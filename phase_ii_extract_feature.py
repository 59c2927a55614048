"""Phase II: Grad-CAM over the long-tailed training set, class-specific / class-generic split,
confusing classes of the tail classes, and the offline feature store.

    python phase_ii_extract_feature.py --config cifar10-LT_resnet18 --device 0

Dataset and model come from the phase I run with the same --config and --note
(checkpoints/phase_i/<config>/<note>/); outputs go to features/<config>/<note>/. With
--opts backbone=ID they come from phase I method ID's run (checkpoints/phase_i-ID/...) and go to
features-ID/<config>/<note>/ (ID: a phase I method of engine/methods/, e.g. cosine_ce, ldam_drw, cbd).
"""
from utils.cli import RunSpec, phase_parser, run_cli


def main() -> None:
    parser = phase_parser(__doc__, training=False)
    parser.add_argument("--overwrite", action="store_true", help="replace finished phase II outputs of this config and note")
    parser.add_argument("--checkpoint", help="phase I checkpoint to use (default: checkpoints/phase_i/<config>/<note>/best_model.pt)")
    args = parser.parse_args()
    from engine import phase_ii  # imported after argument parsing so --help stays fast

    phase_ii.run(RunSpec.from_args(args))


if __name__ == "__main__":
    run_cli(main)
