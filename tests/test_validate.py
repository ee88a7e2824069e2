"""validate.py: equals the trainer's log and an independent loop, counts each image once under
torchrun, reads all three checkpoint formats, refuses bad inputs with exit 2, and 448-style
fine-tuning (the demo model at twice its resolution) validates at the new size."""
from __future__ import annotations

import csv
import json
import logging
import math
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from trainer_helpers import ROOT, env, load, tiny_overrides
from tresnet_train.config import ConfigError, load_config
from tresnet_train.models import create_model
from tresnet_train.validation import main

JSON_KEYS = {"model", "checkpoint", "top1", "top5", "loss", "num_images", "img_size", "crop_pct",
             "resize_mode", "backend", "images_per_s"}


@pytest.fixture
def trained(reference):
    """The shared tiny 2-epoch run (model + EMA, conftest.py): its last.pth and the val records it logged."""
    return reference.out


def last_val(run_dir: Path) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r["kind"] == "val"][-1]


def validate(tmp_path: Path, *argv: str, name: str = "out") -> tuple[int, dict | None]:
    """main() in this process (no torch import per call); returns (exit code, JSON or None)."""
    out = tmp_path / f"{name}.json"
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        rc = main([*argv, "--workers", "0", "--json", str(out)])
    finally:  # main() installs its console handler on the root logger; give pytest's back
        root.handlers[:], root.level = handlers, level
    return rc, json.loads(out.read_text()) if out.is_file() else None


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def independent_eval(state_dict: dict, val_dir: Path, img_size: int = 32, crop_pct: float = 0.875,
                     squash: bool = False):
    """A plain loop with the same preprocessing, written from scratch: PIL RGB, short side to
    floor(img_size / crop_pct) (bilinear), center crop, [0, 1] (TResNet: no mean/std); with
    `squash`, the whole image to img_size x img_size instead (the official TResNet 448 protocol)."""
    model = create_model("tresnet_tiny", num_classes=10)
    model.load_state_dict(state_dict)
    model.eval()
    classes = sorted(p.name for p in val_dir.iterdir() if p.is_dir())
    short = math.floor(img_size / crop_pct)
    images, labels, names = [], [], []
    for label, cls in enumerate(classes):
        for path in sorted((val_dir / cls).iterdir()):
            img = Image.open(path).convert("RGB")
            w, h = img.size
            if squash:
                size = (img_size, img_size)  # the center crop below then takes it all
            else:
                size = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
            img = img.resize(size, Image.BILINEAR)
            left, top = round((size[0] - img_size) / 2), round((size[1] - img_size) / 2)
            img = img.crop((left, top, left + img_size, top + img_size))
            images.append(torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255)
            labels.append(label)
            names.append(f"{cls}/{path.name}")
    with torch.no_grad():
        logits = torch.cat([model(torch.stack(images[i:i + 64])) for i in range(0, len(images), 64)])
    preds = logits.argmax(dim=1)
    top1 = 100.0 * (preds == torch.tensor(labels)).double().mean().item()
    return top1, dict(zip(names, (classes[p] for p in preds.tolist())))


@pytest.mark.slow
def test_top1_equals_trainer_log_and_an_independent_loop(tmp_path, trained, digits):
    ckpt, logged = trained / "last.pth", last_val(trained)
    state = load(ckpt)
    for flag, weights, data, key in (("--no-ema", "model", digits, "val"),
                                     ("--ema", "ema", digits / "val", "val_ema")):
        rc, result = validate(tmp_path, "--ckpt", str(ckpt), "--data", str(data), flag,
                              "--backend", "torch", "--predictions", str(tmp_path / "pred.csv"))
        assert rc == 0
        assert JSON_KEYS <= result.keys()
        assert (result["model"], result["weights"], result["num_images"]) == ("tresnet_tiny", weights, 359)
        assert (result["img_size"], result["crop_pct"], result["resize"]) == (32, 0.875, 36)
        assert result["images_per_s"] > 0 and result["backend"] == "torch"
        # the trainer validated these very weights at the end of epoch 2
        assert result["top1"] == pytest.approx(logged[f"{key}/top1"], abs=1e-9)
        assert result["top5"] == pytest.approx(logged[f"{key}/top5"], abs=1e-9)
        assert result["loss"] == pytest.approx(logged[f"{key}/loss"], rel=1e-5)
        top1, preds = independent_eval(state[weights], digits / "val")
        assert result["top1"] == pytest.approx(top1, abs=1e-9)
        rows = read_csv(tmp_path / "pred.csv")
        assert list(rows[0]) == ["path", "label", "pred", "prob"] and len(rows) == 359
        assert {"/".join(Path(r["path"]).parts[-2:]): r["pred"] for r in rows} == preds
        assert all(r["label"] == Path(r["path"]).parent.name and 0 < float(r["prob"]) <= 1
                   for r in rows)

    # neither flag: the weights the trainer found best
    rc, result = validate(tmp_path, "--ckpt", str(ckpt), "--data", str(digits), "--backend", "torch")
    assert rc == 0 and result["weights"] == state["best_source"]


@pytest.mark.slow
def test_squash_protocol_equals_an_independent_loop(tmp_path, trained, digits, capsys):
    """--resize squash (the official TResNet 448 evaluation): the whole image to img_size^2, no crop;
    the JSON and the printed table say so."""
    ckpt = trained / "last.pth"
    common = ("--ckpt", str(ckpt), "--data", str(digits), "--no-ema", "--backend", "torch")
    capsys.readouterr()
    _, crop = validate(tmp_path, *common, name="crop")  # the default
    assert crop["resize_mode"] == "crop"
    assert "preprocess  crop: resize 36, center crop 32 (crop_pct 0.875)" in capsys.readouterr().out
    rc, result = validate(tmp_path, *common, "--resize", "squash", "--predictions",
                          str(tmp_path / "pred.csv"), name="squash")
    assert rc == 0 and (result["resize_mode"], result["img_size"], result["resize"],
                        result["crop_pct"]) == ("squash", 32, 32, None)
    assert "preprocess  squash: resize to 32x32, no crop" in capsys.readouterr().out
    top1, preds = independent_eval(load(ckpt)["model"], digits / "val", squash=True)
    assert result["top1"] == pytest.approx(top1, abs=1e-9)
    assert {"/".join(Path(r["path"]).parts[-2:]): r["pred"] for r in read_csv(tmp_path / "pred.csv")} == preds
    assert result["loss"] != crop["loss"]  # the digits are 32 px squares: squash skips crop's zoom


@pytest.mark.slow
@pytest.mark.parametrize("resize", ["crop", "squash"])
def test_dali_backend_agrees_with_torch(tmp_path, trained, digits, resize):
    pytest.importorskip("nvidia.dali")
    args = ("--ckpt", str(trained / "last.pth"), "--data", str(digits), "--no-ema", "--resize", resize)
    _, torch_result = validate(tmp_path, *args, "--backend", "torch", name="torch")
    rc, dali_result = validate(tmp_path, *args, "--backend", "dali", name="dali")
    assert rc == 0 and dali_result["backend"] == "dali" and dali_result["num_images"] == 359
    assert dali_result["resize_mode"] == torch_result["resize_mode"] == resize
    # same resize rule, different resampling code: a few borderline digits may flip
    assert abs(dali_result["top1"] - torch_result["top1"]) <= 2.0


@pytest.mark.slow
def test_torchrun_two_processes_count_each_image_once(tmp_path, trained, digits):
    """359 val images (odd): rank 1 gets a padding sample, which must not count."""
    results, rows = {}, {}
    for nproc in (1, 2):
        launch = ([sys.executable] if nproc == 1 else
                  [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}"])
        proc = subprocess.run(
            launch + ["validate.py", "--ckpt", str(trained / "last.pth"), "--data", str(digits),
                      "--backend", "torch", "--workers", "0", "--batch-size", "16",
                      "--json", str(tmp_path / f"{nproc}.json"),
                      "--predictions", str(tmp_path / f"{nproc}.csv")],
            cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert len(re.findall(r"^top-1 ", proc.stdout, re.M)) == 1  # the table, from rank 0 only
        results[nproc] = json.loads((tmp_path / f"{nproc}.json").read_text())
        rows[nproc] = read_csv(tmp_path / f"{nproc}.csv")
    assert results[2]["world_size"] == 2 and results[2]["num_images"] == 359
    for key in ("top1", "top5", "num_images"):
        assert results[1][key] == pytest.approx(results[2][key], abs=1e-9)
    assert results[1]["loss"] == pytest.approx(results[2]["loss"], rel=1e-6)
    assert [(r["path"], r["label"], r["pred"]) for r in rows[1]] == \
        [(r["path"], r["label"], r["pred"]) for r in rows[2]]
    assert len({r["path"] for r in rows[2]}) == 359
    assert [float(r["prob"]) for r in rows[1]] == pytest.approx([float(r["prob"]) for r in rows[2]],
                                                                abs=1e-5)


def _to_official(state_dict: dict) -> dict:
    """Our layout -> the official TResNet key names (plain conv_abn form); weights unchanged."""
    out = {}
    for k, v in state_dict.items():
        k = re.sub(r"conv(\d+)\.conv\.", r"conv\1.0.", k)
        k = re.sub(r"conv(\d+)\.bn\.", r"conv\1.1.", k)
        k = re.sub(r"downsample\.(\d+)\.conv\.", r"downsample.\1.0.", k)
        k = re.sub(r"downsample\.(\d+)\.bn\.", r"downsample.\1.1.", k)
        out[k] = v
    return out


@pytest.mark.slow
def test_timm_and_official_formats_need_model_and_give_the_same_numbers(tmp_path, trained, digits,
                                                                       capsys):
    model_sd = load(trained / "last.pth")["model"]
    logged = last_val(trained)
    torch.save(model_sd, tmp_path / "timm.pth")
    common = ("--data", str(digits), "--backend", "torch", "--img-size", "32")  # no size inside
    rc, result = validate(tmp_path, "--ckpt", str(tmp_path / "timm.pth"), "--model", "tresnet_tiny",
                          *common)
    assert rc == 0 and result["format"] == "timm"
    assert result["top1"] == pytest.approx(logged["val/top1"], abs=1e-9)

    capsys.readouterr()
    rc, _ = validate(tmp_path, "--ckpt", str(tmp_path / "timm.pth"), *common)
    err = capsys.readouterr().err
    assert rc == 2 and "pass --model NAME" in err and "Traceback" not in err

    # Official files hold InPlace-ABN weights w, which scale by |w| + 1e-5: the same network as
    # BatchNorm weights |w| + 1e-5 in our layout.
    torch.save({"model": _to_official(model_sd)}, tmp_path / "official.pth")
    as_bn = {k: v.abs() + 1e-5 if k.endswith(".bn.weight") else v for k, v in model_sd.items()}
    torch.save(as_bn, tmp_path / "as_bn.pth")
    rc, official = validate(tmp_path, "--ckpt", str(tmp_path / "official.pth"), "--model",
                            "tresnet_tiny", *common, name="official")
    assert rc == 0 and official["format"] == "official"
    _, reference = validate(tmp_path, "--ckpt", str(tmp_path / "as_bn.pth"), "--model",
                            "tresnet_tiny", *common, name="as_bn")
    for key in ("top1", "top5", "loss", "num_images"):
        assert official[key] == reference[key]


def test_class_count_mismatch_is_one_clear_line_and_exit_2(tmp_path, trained, digits, capsys):
    nine = tmp_path / "nine"
    nine.mkdir()
    for cls in sorted((digits / "val").iterdir())[:9]:
        (nine / cls.name).symlink_to(cls)
    torch.save(load(trained / "last.pth")["model"], tmp_path / "timm.pth")
    for extra in ((), ("--model", "tresnet_tiny")):
        ckpt = trained / "last.pth" if not extra else tmp_path / "timm.pth"
        capsys.readouterr()
        rc, result = validate(tmp_path, "--ckpt", str(ckpt), "--data", str(nine), *extra)
        err = capsys.readouterr().err.strip()
        assert rc == 2 and result is None
        assert "class count mismatch" in err and "10 classes" in err and "9 class folders" in err
        assert len(err.splitlines()) == 1


@pytest.mark.parametrize("args, needle", [
    (["--img-size", "0"], "--img-size must be > 0"),
    (["--crop-pct", "1.5"], "--crop-pct must be in (0, 1]"),
    (["--resize", "squash", "--crop-pct", "0.9"], "--crop-pct applies to --resize crop"),
    (["--model", "tresnet_mm"], "Unknown model 'tresnet_mm'"),
    (["--data", "/nonexistent/folder"], "folder not found"),
    (["--data", "TRAIN_ONLY"], "has train/ but no val/"),
    (["--ckpt", "/nonexistent/ckpt.pth"], "checkpoint not found"),
])
def test_usage_errors_exit_2_with_one_line(tmp_path, trained, digits, capsys, args, needle):
    base = {"--ckpt": str(trained / "last.pth"), "--data": str(digits)}
    base.update(dict(zip(args[::2], args[1::2])))
    if base["--data"] == "TRAIN_ONLY":
        (tmp_path / "train_only" / "train" / "0").mkdir(parents=True)
        base["--data"] = str(tmp_path / "train_only")
    rc, _ = validate(tmp_path, *[x for kv in base.items() for x in kv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and needle in err and len(err.splitlines()) == 1, err


def test_ema_requested_but_absent_is_a_clear_error(tmp_path, trained, digits, capsys):
    state = load(trained / "last.pth")
    state["ema"] = None
    torch.save(state, tmp_path / "no_ema.pth")
    rc, _ = validate(tmp_path, "--ckpt", str(tmp_path / "no_ema.pth"), "--data", str(digits), "--ema")
    assert rc == 2 and "holds no ema weights" in capsys.readouterr().err


class _RunsCode:
    """Unpickling this runs a shell command (the classic pickle exploit)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        import os
        return os.system, (self.command,)


def test_malicious_checkpoint_is_refused_and_nothing_runs(tmp_path, trained, digits, capsys):
    marker = tmp_path / "pwned"
    state = load(trained / "last.pth")  # a real checkpoint, with a payload added
    state["note"] = _RunsCode(f"touch {shlex.quote(str(marker))}")
    torch.save(state, tmp_path / "evil.pth")

    rc, result = validate(tmp_path, "--ckpt", str(tmp_path / "evil.pth"), "--data", str(digits))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and result is None
    assert "refusing to load" in err and len(err.splitlines()) == 1, err
    assert not marker.exists()

    # the file is a real exploit: a full unpickle would have run the command
    torch.load(tmp_path / "evil.pth", weights_only=False)
    assert marker.exists()


def test_448_recipes_fine_tune_from_the_224_runs():
    for size in ("m", "l", "xl"):
        path = ROOT / "configs" / f"tresnet_{size}_448.yaml"
        base = load_config(ROOT / "configs" / f"tresnet_{size}.yaml")
        with pytest.raises(ConfigError, match=f"init_from.*runs/tresnet_{size}/best.pth"):
            load_config(path)  # starts from the 224 recipe's best.pth: a clear error until it exists
        cfg = load_config(path, [f"model.init_from={path}"])
        assert cfg.model.name == base.model.name and cfg.data.img_size == 448
        assert cfg.train.epochs == 10 and cfg.optim.warmup_epochs < 1
        assert cfg.data.batch_size == round(base.data.batch_size / 4)
        assert cfg.optim.lr < base.optim.lr
        assert cfg.run.output_dir != base.run.output_dir and cfg.run.resume == "auto"
        assert path.read_text().startswith("# TResNet-") and "Expected top-1" in path.read_text()


@pytest.mark.slow
def test_fine_tune_at_twice_the_resolution_then_validate_there(tmp_path, trained, digits):
    """The 448 recipe's mechanics on the demo model: init_from a 32-px run, one epoch at 64 px."""
    out = tmp_path / "ft"
    overrides = tiny_overrides(out, digits, **{
        "model.init_from": trained / "last.pth", "data.img_size": 64, "train.epochs": 1,
        "train.amp": "none", "model.drop_path_rate": 0.0, "optim.warmup_epochs": 0.2})
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/tresnet_m_448.yaml",
                           *overrides], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "initialised weights from" in proc.stdout and "starting a fresh run" in proc.stdout
    ft, src = load(out / "last.pth"), load(trained / "last.pth")
    assert ft["global_step"] == 6 and ft["epoch"] == 1  # a fresh schedule, not step 12 onwards
    assert ft["config"]["data"]["randaugment"] == "rand-m6-mstd0.5-inc1"  # the recipe's own settings

    # started from the source's weights: much nearer to them than a fresh model is
    start = src["ema"] if src["best_source"] == "ema" else src["model"]
    fresh = create_model("tresnet_tiny", num_classes=10).state_dict()
    convs = [k for k, v in start.items() if v.ndim == 4]
    dist = lambda a, b: sum((a[k] - b[k]).pow(2).sum() for k in convs).sqrt()  # noqa: E731
    assert dist(ft["model"], start) < 0.5 * dist(fresh, start)

    rc, result = validate(tmp_path, "--ckpt", str(out / "last.pth"), "--data", str(digits),
                          "--no-ema", "--backend", "torch")
    assert rc == 0 and (result["img_size"], result["resize"]) == (64, 73)
    assert result["top1"] == pytest.approx(last_val(out)["val/top1"], abs=1e-9)
    top1, _ = independent_eval(ft["model"], digits / "val", img_size=64)
    assert result["top1"] == pytest.approx(top1, abs=1e-9)
