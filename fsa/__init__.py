"""Feature Space Augmentation (Chu et al., ECCV 2020): Grad-CAM, decomposition, confusing
classes, head/tail split and fusion. See docs/ARCHITECTURE.md and docs/METHOD.md section 2.

Submodules are imported explicitly (``from fsa.fusion import fuse``); this package file stays
import-light so that ``fsa.generators`` and ``fsa.feature_store`` load independently.
"""

from fsa.class_split import head_tail_split
from fsa.confusion import ScoreAccumulator, confusing_classes, confusing_table
from fsa.decomposition import SplitStatistics, split_masks
from fsa.fusion import DonorPool, FusionInfo, fuse, fuse_from_cams, sample_donors
from fsa.gradcam import CamExtractor, features_and_cams

__all__ = [
    "head_tail_split",
    "ScoreAccumulator",
    "confusing_classes",
    "confusing_table",
    "SplitStatistics",
    "split_masks",
    "DonorPool",
    "FusionInfo",
    "fuse",
    "fuse_from_cams",
    "sample_donors",
    "CamExtractor",
    "features_and_cams",
]
