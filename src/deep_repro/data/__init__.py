"""Data: download, verify, decode and split Fashion-MNIST; describe what was split.

Owns the raw files and their sha256 checks, the IDX decoding into arrays (`dataset`) and the data
report of the `analyze` stage (`analysis`: class balance, intensities, duplicates across splits).
"""

from deep_repro.config.task import (
    CLASS_NAMES,
    IMAGE_SHAPE,
    NUM_CLASSES,
    PIXEL_MEAN,
    PIXEL_STD,
    class_label,
)
from deep_repro.data.dataset import (
    GZIP_ERRORS,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    OFFLINE_HINT,
    TMP_MARK,
    MirrorFailure,
    Splits,
    array_digest,
    download_file,
    load_arrays,
    load_idx_pair,
    load_splits,
    make_split,
    netrc_login,
    parse_idx,
    save_arrays,
    stratified_indices,
    stratified_subset,
    write_idx,
)

__all__ = [
    "CLASS_NAMES",
    "GZIP_ERRORS",
    "IDX_IMAGES_MAGIC",
    "IDX_LABELS_MAGIC",
    "IMAGE_SHAPE",
    "NUM_CLASSES",
    "OFFLINE_HINT",
    "PIXEL_MEAN",
    "PIXEL_STD",
    "TMP_MARK",
    "MirrorFailure",
    "Splits",
    "array_digest",
    "class_label",
    "download_file",
    "load_arrays",
    "load_idx_pair",
    "load_splits",
    "make_split",
    "netrc_login",
    "parse_idx",
    "save_arrays",
    "stratified_indices",
    "stratified_subset",
    "write_idx",
]
