"""Evaluate a training checkpoint's model on a folder's val split, as the trainer does; JSON out.

Run with python (one process) or torchrun (several): used to show each image counts once.
"""
import json
import sys

from tresnet_train import checkpoint
from tresnet_train.config import from_dict
from tresnet_train.data import build_loaders
from tresnet_train.distributed import cleanup, init_distributed
from tresnet_train.engine import evaluate
from tresnet_train.models import create_model, get_data_config
from tresnet_train.precision import Precision

ckpt_path, data_root, out_path = sys.argv[1:4]
state = checkpoint.load(ckpt_path)
cfg = from_dict(state["config"])
cfg.data.source, cfg.data.root, cfg.data.val_batch_size = "folder", data_root, 7
world, device = init_distributed("cpu")
model = create_model(cfg.model.name, num_classes=cfg.model.num_classes)
model.load_state_dict(state["model"])
_, val_loader = build_loaders(cfg, get_data_config(model), world, device)
result = evaluate(model, val_loader, Precision("none", device), device)
if world.is_main:
    json.dump(result, open(out_path, "w"))
cleanup()
