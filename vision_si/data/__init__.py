"""Data layer: sources, decoding, splits, augmentation and loaders.

Sources return a `SampleTable`; `load_images` turns rows into N×C×H×W float32 in [0, 1];
`make_splits` assigns train/val/test; `load_real_data` is the one path from a run config (and a run
directory's recorded split) to a run's split data, `LabelledImages` the bundle a split travels as;
`build_augmentation` gives the albumentations pipeline.
See `data/README.md` for the supported layouts.
"""

from vision_si.data.arrays import LabelledImages, check_images
from vision_si.data.augment import PRESETS, build_augmentation, save_augmentation
from vision_si.data.decode import IMAGE_EXTENSIONS, MAX_PIXELS, decode_image, resize_image
from vision_si.data.files import BadImageWarning, cap_per_class, write_skipped_csv
from vision_si.data.images import load_image_files, load_images, run_channels
from vision_si.data.real import RealData, load_real_data
from vision_si.data.sources import (
    ELPV_CLASSES,
    load_csv,
    load_digits,
    load_elpv,
    load_imagefolder,
    load_medmnist,
    load_source,
    load_unlabelled,
)
from vision_si.data.splits import (
    align_splits,
    judge_split,
    make_splits,
    read_splits_csv,
    split_groups,
    splits_csv_text,
    write_splits_csv,
)
from vision_si.data.table import SampleTable

__all__ = [
    "SampleTable", "LabelledImages", "check_images", "RealData", "load_real_data",
    "load_source", "load_elpv", "load_imagefolder", "load_csv", "load_medmnist", "load_digits", "ELPV_CLASSES",
    "load_unlabelled",
    "decode_image", "resize_image", "load_image_files", "load_images", "run_channels", "IMAGE_EXTENSIONS", "MAX_PIXELS",
    "BadImageWarning", "cap_per_class",
    "make_splits", "write_splits_csv", "splits_csv_text", "read_splits_csv", "align_splits", "split_groups",
    "judge_split", "write_skipped_csv",
    "build_augmentation", "save_augmentation", "PRESETS",
]
