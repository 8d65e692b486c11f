"""The users' dataset layout (read, validate, convert to COCO), synthetic data of the same format, and RLE.

Torch-free: training wraps these samples in a torch ``Dataset`` elsewhere.
"""

from cellseg_deploy.data.io import image_size, read_id_mask, read_image, write_id_mask_tif, write_image_tif
from cellseg_deploy.data.layout import (
    Sample,
    TestEntry,
    list_images,
    list_train_ids,
    load_sample,
    load_test_index,
    read_test_index,
    split_train_val,
)

__all__ = [
    "Sample",
    "TestEntry",
    "image_size",
    "list_images",
    "list_train_ids",
    "load_sample",
    "load_test_index",
    "read_id_mask",
    "read_image",
    "read_test_index",
    "split_train_val",
    "write_id_mask_tif",
    "write_image_tif",
]
