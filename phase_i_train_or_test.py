"""Phase I: train (or test) the backbone + classifier on the long-tailed training set.

    python phase_i_train_or_test.py --config cifar10-LT_resnet18 --device 0
"""
from utils.cli import phase_parser, run_cli


def main() -> None:
    parser = phase_parser(__doc__)
    parser.add_argument("--checkpoint", help="phase: test only: checkpoint to evaluate (default: this run's best_model.pt)")
    args = parser.parse_args()
    from engine import phase_i  # imported after argument parsing so --help stays fast

    phase_i.run(args)


if __name__ == "__main__":
    run_cli(main)
