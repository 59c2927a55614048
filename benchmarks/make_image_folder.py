"""Write a small long-tailed image folder (PNG files, one folder per class) from Fashion-MNIST's IDX files:
the "own data" a user brings, for measuring the example config `configs/phase_i/image-folder_example.yaml`.

    python benchmarks/make_image_folder.py data/fashion-folder              # 10 classes, 100 -> 10 images
    python benchmarks/make_image_folder.py DIR --max 100 --imbalance 10 --test 100 --seed 0

train/<class>/*.png holds n_i = floor(max * imbalance^(-i/9)) images of class i (about 400 in all);
test/<class>/*.png holds `--test` images of every class from Fashion-MNIST's test set.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import cv2
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datasets.fashion_mnist import CLASS_NAMES, FILES, find_fashion_mnist, read_idx  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--max", type=int, default=100, help="training images of the largest class")
    parser.add_argument("--imbalance", type=float, default=10.0)
    parser.add_argument("--test", type=int, default=100, help="test images per class")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    files = find_fashion_mnist(None)
    if files is None:
        sys.exit("error: Fashion-MNIST's IDX files were not found: apt-get install dataset-fashion-mnist")
    rng = np.random.default_rng(args.seed)
    classes = len(CLASS_NAMES)
    for split, per_class in (("train", None), ("test", args.test)):
        images, labels = read_idx(files[(split, "images")]), read_idx(files[(split, "labels")])
        for c, name in enumerate(CLASS_NAMES):
            count = per_class or int(args.max * args.imbalance ** (-c / (classes - 1)))
            chosen = rng.choice(np.flatnonzero(labels == c), size=count, replace=False)
            folder = args.out / split / f"{c}_{name.replace('/', '-')}"
            folder.mkdir(parents=True, exist_ok=True)
            for k, index in enumerate(chosen):
                cv2.imwrite(str(folder / f"{k:04d}.png"), images[index])
    print(f"wrote {args.out}/train and {args.out}/test ({FILES[('train', 'images')]} of {files[('train', 'images')].parent})")


if __name__ == "__main__":
    main()
