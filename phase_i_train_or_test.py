"""Phase I: train (or test) the backbone + classifier on the long-tailed training set.

    python phase_i_train_or_test.py --config cifar10-LT_resnet18 --device 0
"""
from utils.cli import RunSpec, run_cli, training_parser


def main() -> None:
    from engine.methods import phase_i_help  # the table imports nothing heavy

    args = training_parser(f"{__doc__}\n{phase_i_help()}").parse_args()
    from engine import phase_i  # imported after argument parsing so --help stays fast

    phase_i.run(RunSpec.from_args(args))


if __name__ == "__main__":
    run_cli(main)
