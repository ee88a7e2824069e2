"""Data pipelines: ImageNet-style folders through DALI or torchvision, plus the digits demo and
synthetic data.

    train_loader, val_loader = build_loaders(cfg, data_config, world, device)

train_loader: `len()` batches per epoch on every rank; `set_epoch(epoch, start_step=0)` positions the
next `iter()`, which yields (images float32 NCHW normalised on `device`, targets int64 on `device`);
`state_dict()` / `load_state_dict()` for exact mid-epoch resume; `classes`; `skipped` (undecodable
files left out). val_loader: the same (images, targets) with target -1 on padding samples, so that
across ranks every image counts once; `num_images`.
"""
from .build import build_loaders, dataset_root, resolve_backend
from .folder import DataError, check_image, index_images, index_split, scan_image_folder
from .plan import TrainPlan, ValPlan
from .transforms import Preprocess

__all__ = ["DataError", "build_loaders", "check_image", "dataset_root", "index_images",
           "index_split", "resolve_backend", "scan_image_folder", "Preprocess", "TrainPlan",
           "ValPlan"]
