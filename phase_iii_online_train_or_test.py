"""Phase III (online): fine-tune the classifier with feature-space augmentation.

    python phase_iii_online_train_or_test.py --config cifar10-LT_resnet18 --device 0
    python phase_iii_online_train_or_test.py --config cifar10-LT_resnet18 --opts finetune.generator=none   # cRT control
"""
from utils.cli import RunSpec, phase_iii_parser, run_cli


def main() -> None:
    from engine.methods import phase_iii_help  # the table imports nothing heavy

    args = phase_iii_parser(f"{__doc__}\n{phase_iii_help('online')}").parse_args()
    from engine import phase_iii  # imported after argument parsing so --help stays fast

    phase_iii.run(RunSpec.from_args(args), "online")


if __name__ == "__main__":
    run_cli(main)
