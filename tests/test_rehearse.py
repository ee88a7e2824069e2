"""The recipe rehearsal (`python -m tresnet_train.rehearse`): what it changes in a config, how it
reports, and the rehearsal itself on real photos, walking each feature of the shipped recipes once.

The full rehearsal (every config through DALI and torchvision, 22 runs) took 80 minutes on two
loaded CPU cores; the slow tests here run the same command on three configs chosen so that each of
these is walked once: InPlace-ABN (forced, as a GPU's `auto` picks it) with sync norm and EMA, a 448
config initialised from its 224 rehearsal, BCE + LAMB + repeated augmentation + mixup/cutmix (ResNet
strikes back A1), the torchvision loader and the DALI loader (about 8 minutes). ResNeSt is left to
the user command's full rehearsal, to keep the suite inside its budget.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from data_helpers import DATA_ENV, find_real_photos
from trainer_helpers import ROOT, env
from tresnet_train import rehearse
from tresnet_train.config import load_config
from tresnet_train.models.layers import inplace_abn_available

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
DATA = find_real_photos("imagenette-mini-96")  # 10 classes, 40 train + 10 val photos each
VAL_PER_CLASS = 2  # val photos the rehearsals see: 20, 10 per process (a full batch of 8 and a partial one)
needs_data = pytest.mark.skipif(
    DATA is None, reason=f"real photos not found: set ${DATA_ENV} to a folder holding "
                         f"imagenette-mini-96/ (ImageNet-style, train/ and val/)")

# What a rehearsal may change (rehearse.miniature_overrides); anything else would make it another recipe.
SIZES = {"data.root", "model.num_classes", "data.img_size", "data.val_img_size", "data.batch_size",
         "data.val_batch_size", "data.workers", "train.epochs", "train.steps_per_epoch",
         "run.ckpt_every_steps", "run.output_dir", "data.backend", "model.init_from",
         "optim.cooldown_epochs"}  # the cool-down shrinks with train.epochs
CPU_ONLY = {"train.amp", "model.norm"}

# (configs named on the command line, backends, --set): together they walk each feature once. No
# shipped recipe syncs batch statistics (model.sync_bn is off by default, as published), so the
# InPlace-ABN run turns it on the way a user would: InPlace-ABN + sync + EMA in one run.
SUBSETS = {
    "iabn-sync-ema-448-torch": (["configs/tresnet_m_448.yaml"], "torch",  # + tresnet_m.yaml first
                                ["--set", "model.sync_bn=true"]),
    "rsb-a1-dali": (["configs/resnet50_a1.yaml"], "dali", []),  # BCE, LAMB, repeated aug, cutmix
}


def _overrides(path: Path, cuda: bool, tmp_path: Path, iabn: bool = True) -> dict:
    cfg = load_config(path, ["model.init_from=none"])
    return rehearse.miniature_overrides(cfg, data_root=tmp_path, num_classes=10,
                                        run_dir=tmp_path / "run", backend="torch", cuda=cuda, nproc=2,
                                        iabn_installed=iabn, init_from=None)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_overrides_are_sizes_data_and_the_gpus_choices_only(path, tmp_path):
    cfg = load_config(path, ["model.init_from=none"])
    on_cpu, on_gpu = _overrides(path, False, tmp_path), _overrides(path, True, tmp_path)
    assert set(on_gpu) <= SIZES, set(on_gpu) - SIZES  # on a GPU: amp and norm as configured
    assert set(on_cpu) <= SIZES | CPU_ONLY, set(on_cpu) - SIZES - CPU_ONLY
    assert on_cpu.get("train.amp", "none") == "none"
    size = on_cpu["data.img_size"]
    assert size % 32 == 0 and size >= 32 and on_cpu["data.batch_size"] % 2 == 0
    if cfg.data.val_img_size:  # train/test resolution ratio kept (ResNet strikes back A3)
        assert on_cpu["data.val_img_size"] > size
    if rehearse.is_tresnet(cfg.model.name) and cfg.model.norm == "auto":
        assert on_cpu["model.norm"] == "iabn"  # what auto picks on a GPU, forced on the CPU
        assert "model.norm" not in _overrides(path, False, tmp_path, iabn=False)
    else:
        assert "model.norm" not in on_cpu
    if cfg.data.source == "folder":
        assert on_cpu["data.root"] == str(tmp_path) and on_cpu["model.num_classes"] == 10
    # every rank gets >= 2 steps per epoch from 40 images per class, repeated augmentation included
    per_rank = 400 // 2 // on_cpu["data.batch_size"]
    assert per_rank >= rehearse.MINI_STEPS >= 3


def test_sizes_keep_the_recipes_ratios():
    assert [rehearse.small_size(px) for px in (32, 160, 224, 448)] == [32, 32, 64, 128]


def test_448_configs_start_from_their_224_rehearsal(tmp_path):
    cases = rehearse.plan([ROOT / "configs/tresnet_m_448.yaml", ROOT / "configs/tresnet_xl_448.yaml",
                           ROOT / "configs/tresnet_xl.yaml"], ["dali", "torch"], tmp_path)
    order = [(c.config.stem, c.backend) for c in cases]
    assert order == [("tresnet_m", "dali"), ("tresnet_m", "torch"),
                     ("tresnet_m_448", "dali"), ("tresnet_m_448", "torch"),
                     ("tresnet_xl", "dali"), ("tresnet_xl", "torch"),
                     ("tresnet_xl_448", "dali"), ("tresnet_xl_448", "torch")]
    for case in cases:
        if case.config.stem.endswith("_448"):
            assert case.producer.config.stem == case.config.stem[:-4]
            assert case.producer.backend == case.backend and case.init_name == "best.pth"
        else:
            assert case.producer is None


def test_failure_line_is_the_root_cause_with_its_message():
    log = "\n".join([
        "[rank1]: Traceback (most recent call last):",
        "[rank1]: RuntimeError: [gloo] Connection closed by peer [127.0.0.1]:5555",
        "[rank0]:   File \"train.py\", line 10, in <module>",
        "[rank0]: RuntimeError: Error(s) in loading state_dict for TResNet:",
        "[rank0]: \tbody.layer1.0.conv2.bn.weight has 4 negative BatchNorm scale(s) (min -0.002)",
        "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:",
        "launch.py: workers exited with {0: 1, 1: 1}; exit code 1",
    ])
    assert rehearse.failure_line(log) == ("RuntimeError: Error(s) in loading state_dict for TResNet: "
                                          "body.layer1.0.conv2.bn.weight has 4 negative BatchNorm "
                                          "scale(s) (min -0.002)")
    assert rehearse.failure_line("config error: unknown config key 'optim.lrr'\n") == \
        "config error: unknown config key 'optim.lrr'"


def test_usage_errors_exit_2(tmp_path, capsys):
    config = str(ROOT / "configs/tresnet_m.yaml")
    assert rehearse.main([config, "--data", str(tmp_path / "nowhere")]) == 2
    assert "--data" in capsys.readouterr().err
    assert rehearse.main([str(ROOT / "configs/nope.yaml"), "--data", str(tmp_path)]) == 2
    assert "not found" in capsys.readouterr().err
    assert rehearse.main([config, "--data", str(tmp_path), "--backends", "pil"]) == 2
    assert "--backends" in capsys.readouterr().err
    assert rehearse.main([config, "--data", str(tmp_path), "--set", "data.batch_size=64"]) == 2
    assert "data.batch_size" in capsys.readouterr().err  # sizes are the rehearsal's own


def _few_val_photos(dst: Path) -> Path:
    """DATA with VAL_PER_CLASS val photos per class (all train photos, copied): the rehearsal's steps
    are fixed, but each of its validations (two trainer epochs, validate.py) goes through the whole
    val folder, and the checks compare those runs' top-1 and loss with each other, not with a level."""
    shutil.copytree(DATA / "train", dst / "train")
    for folder in sorted((DATA / "val").iterdir()):
        (dst / "val" / folder.name).mkdir(parents=True)
        for photo in sorted(folder.iterdir())[:VAL_PER_CLASS]:
            shutil.copy2(photo, dst / "val" / folder.name / photo.name)
    return dst


def _rehearse(subset: str, tmp_path: Path, cuda: bool) -> tuple[subprocess.CompletedProcess, dict]:
    configs, backends, extra = SUBSETS[subset]
    data = _few_val_photos(tmp_path / "data")
    out = tmp_path / "report.json"
    run_env = env() if cuda else dict(env(), CUDA_VISIBLE_DEVICES="")  # the CPU path anywhere
    command = [sys.executable, "-m", "tresnet_train.rehearse", *configs, "--data", str(data),
               "--backends", backends, *extra, "--out", str(tmp_path / "runs"), "--json", str(out)]
    proc = subprocess.run(command, cwd=ROOT, env=run_env, capture_output=True, text=True,
                          timeout=3600)
    assert out.is_file(), proc.stdout + proc.stderr
    return proc, json.loads(out.read_text())


def _assert_all_passed(proc, report: dict, subset: str) -> None:
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert proc.returncode == 0 and report["passed"], "\n".join(lines) + "\n" + proc.stderr[-3000:]
    names = [(Path(c["config"]).stem, c["backend"]) for c in report["cases"]]
    assert len(lines) == len(report["cases"])
    for case in report["cases"]:
        checks = case["checks"]
        assert checks["stop"] == "pass" and checks["resume"] == "pass", case
        assert checks["validate"].startswith("pass"), case
        assert checks["export"].startswith("pass"), case  # every model here has a timm twin
        assert case["details"]["stopped_at"]["epoch"] == rehearse.MINI_EPOCHS
    if subset == "iabn-sync-ema-448-torch":
        assert names == [("tresnet_m", "torch"), ("tresnet_m_448", "torch")]
        m, m448 = report["cases"]
        assert m448["checks"]["init"] == "pass"
        assert m448["overrides"]["model.init_from"] == str(Path(m["run_dir"]) / "best.pth")
        assert m448["overrides"]["data.img_size"] == 2 * m["overrides"]["data.img_size"]
        assert m["your_overrides"] == m448["your_overrides"] == ["model.sync_bn=true"]
        resolved = yaml.safe_load((Path(m["run_dir"]) / "config.yaml").read_text())
        assert resolved["model"]["sync_bn"] is True and resolved["train"]["ema"] is True
        if inplace_abn_available() and report["device"].startswith("cpu"):
            assert m["overrides"]["model.norm"] == "iabn" and "iabn" in m["norm"]
    else:
        assert names == [("resnet50_a1", "dali")]


@pytest.mark.slow
@needs_data
@pytest.mark.parametrize("subset", SUBSETS)
def test_rehearsal_passes(subset, tmp_path):
    """train (2 processes) -> SIGTERM mid-epoch -> exit 75 -> resume -> validate.py = trainer -> timm."""
    proc, report = _rehearse(subset, tmp_path, cuda=False)
    assert report["device"].startswith("cpu") and report["nproc"] == 2
    _assert_all_passed(proc, report, subset)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@needs_data
@pytest.mark.parametrize("subset", SUBSETS)
def test_rehearsal_passes_on_cuda(subset, tmp_path):
    """The same command on a GPU: NCCL, DALI's mixed decoder, InPlace-ABN's CUDA kernels, autocast."""
    proc, report = _rehearse(subset, tmp_path, cuda=True)
    assert not report["device"].startswith("cpu")
    for case in report["cases"]:  # norm and amp as configured: nothing GPU-specific is overridden
        assert "model.norm" not in case["overrides"] and "train.amp" not in case["overrides"]
    _assert_all_passed(proc, report, subset)
