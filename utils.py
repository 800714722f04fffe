"""The original project's `utils` module: data loading and plots, re-exported from `capsnet.datasets`
and `capsnet.plots`, so that `from utils import combine_images, plot_log` keeps working."""

from capsnet.datasets import (
    CLASS_NAMES,
    KERAS_DATASETS,
    Dataset,
    load_dataset,
    load_idx_folder,
    load_labelled_dataset,
    load_npz,
    prepare,
    read_idx,
)
from capsnet.plots import combine_images, plot_log, plot_model, save_image

__all__ = [
    "CLASS_NAMES", "KERAS_DATASETS", "Dataset", "combine_images", "load_dataset", "load_idx_folder",
    "load_labelled_dataset", "load_npz", "plot_log", "plot_model", "prepare", "read_idx", "save_image",
]
