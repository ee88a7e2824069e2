"""ONNX export (scripts/export.py, tresnet_train/export.py) and validate.py --onnx.

- Every registered model at 224 and TResNet-M at 448: ONNX Runtime's (CPU, fp32) logits equal ours
  within 1e-4, with every norm folded into a convolution, only standard ONNX operators (SpaceToDepth
  and the anti-alias blur included) and a batch axis that takes any batch.
- From a trainer checkpoint on real photos: the export takes the weights validate.py picks (model or
  EMA), the resolution and crop the checkpoint was validated at, writes the JSON; `validate.py --onnx`
  gives the checkpoint's top-1, image by image, through the same preprocessing.
- timm and official TResNet files with --model; ImageNet class names for 1000-class files; an
  InPlace-ABN model's weights; errors.
"""
import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("onnx", reason="the export extra is not installed: pip install -e '.[export]'")
pytest.importorskip("onnxruntime", reason="the export extra is not installed: pip install -e '.[export]'")

from data_helpers import real_photos  # noqa: E402
from test_model_weights import to_official  # noqa: E402
from trainer_helpers import ROOT, env, train  # noqa: E402
from tresnet_train import export  # noqa: E402
from tresnet_train import validation  # noqa: E402
from tresnet_train.models import create_model  # noqa: E402
from tresnet_train.models.layers import inplace_abn_available  # noqa: E402

TOLERANCE = 1e-4  # fp32 logits, ONNX Runtime vs PyTorch


@pytest.mark.parametrize("name,size", [
    pytest.param("tresnet_m", 224, marks=pytest.mark.slow),
    pytest.param("tresnet_m", 448, marks=pytest.mark.slow),
    pytest.param("tresnet_l", 224, marks=pytest.mark.slow),
    pytest.param("tresnet_xl", 224, marks=pytest.mark.slow),
    pytest.param("tresnet_v2_l", 224, marks=pytest.mark.slow),
    pytest.param("resnest50d", 224, marks=pytest.mark.slow),
    pytest.param("resnest101e", 224, marks=pytest.mark.slow),
])
def test_onnx_runtime_logits_equal_ours(tmp_path, randomize_norms, name, size):
    torch.manual_seed(0)
    model = randomize_norms(create_model(name, norm="bn")).eval()
    path = tmp_path / f"{name}.onnx"
    export.export_onnx(model, path, size)

    ops = export.graph_ops(path)
    assert "BatchNormalization" not in ops  # every norm folded into its convolution
    assert not [op for op in ops if "::" in op], ops  # standard ONNX domain only, no custom ops
    if name.startswith("tresnet"):
        assert {"Transpose", "Pad"} <= set(ops)  # SpaceToDepth's permute, the blur's reflect pad

    onnx_model = export.OnnxModel(path, ["CPUExecutionProvider"])
    assert onnx_model.session.get_inputs()[0].shape == ["batch", 3, size, size]
    x = torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
    assert (onnx_model(x) - ours).abs().max().item() <= TOLERANCE
    assert (onnx_model(x[:1]) - ours[:1]).abs().max().item() <= TOLERANCE  # another batch size
    assert ours.std() > 0.01  # the logits carry signal


# ---- from a trainer checkpoint ------------------------------------------------------------------
VAL_SIZE, CROP_PCT = 96, 0.9  # not the model's defaults (224, 0.875): the export must read the run's


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """tresnet_tiny trained a few steps on real photos (model + EMA), validated at 96 px, crop 0.9."""
    out = tmp_path_factory.mktemp("run")
    proc = train(["model.name=tresnet_tiny", "model.num_classes=10", "data.source=folder",
                  f"data.root={real_photos('imagenette-mini-96')}", "data.backend=torch",
                  "data.img_size=64", f"data.val_img_size={VAL_SIZE}", f"data.crop_pct={CROP_PCT}",
                  "data.batch_size=25", "data.workers=0", "train.epochs=1", "train.steps_per_epoch=3",
                  "train.ema_decay=0.5", f"run.output_dir={out}", "run.device=cpu"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def run_validate(*argv: str, out: Path) -> dict:
    """validate.py's main() in this process; returns its JSON."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        assert validation.main([*argv, "--workers", "0", "--backend", "torch", "--json", str(out)]) == 0
    finally:  # main() installs its console handler on the root logger; give pytest's back
        root.handlers[:], root.level = handlers, level
    return json.loads(out.read_text())


@pytest.mark.slow
def test_export_then_validate_onnx_gives_the_checkpoints_top1(tmp_path, run_dir):
    onnx_path = tmp_path / "deploy" / "model.onnx"
    proc = subprocess.run([sys.executable, "scripts/export.py", "--ckpt", str(run_dir / "best.pth"),
                           "--format", "onnx", "--out", str(onnx_path)],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "norms: 14 of 14 folded" in proc.stdout

    info = json.loads((tmp_path / "deploy" / "model.json").read_text())
    state = torch.load(run_dir / "best.pth", weights_only=True)
    assert info["weights"] == (state["best_source"] or "model")
    assert info["classes"] == state["classes"] and len(info["classes"]) == 10
    assert info["input_size"] == [3, VAL_SIZE, VAL_SIZE] and info["crop_pct"] == CROP_PCT
    assert info["resize"] == math.floor(VAL_SIZE / CROP_PCT) and info["resize_mode"] == "crop"
    assert info["mean"] is None and info["std"] is None  # TResNet: RGB in [0, 1], no normalisation

    data = str(real_photos("imagenette-mini-96"))
    ours = run_validate("--ckpt", str(run_dir / "best.pth"), "--data", data,
                        "--predictions", str(tmp_path / "ours.csv"), out=tmp_path / "ours.json")
    onnx = run_validate("--onnx", str(onnx_path), "--data", data,
                        "--predictions", str(tmp_path / "onnx.csv"), out=tmp_path / "onnx.json")
    for key in ("top1", "top5", "num_images", "img_size", "resize", "crop_pct", "resize_mode",
                "interpolation", "weights"):
        assert onnx[key] == ours[key], key
    assert onnx["num_images"] == 100 and onnx["format"] == "onnx"
    assert onnx["loss"] == pytest.approx(ours["loss"], abs=1e-5)
    ours_rows, onnx_rows = ((tmp_path / f"{n}.csv").read_text().splitlines()[1:] for n in ("ours", "onnx"))
    rows = [(a.split(","), b.split(",")) for a, b in zip(ours_rows, onnx_rows)]
    assert len(rows) == 100
    for a, b in rows:  # path, label, pred, prob: the same prediction for every image
        assert a[:3] == b[:3] and abs(float(a[3]) - float(b[3])) <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("ema", [False, True])
def test_export_takes_the_weights_the_trainer_found_best(tmp_path, run_dir, ema):
    state = torch.load(run_dir / "best.pth", weights_only=True)
    state["best_source"] = "ema" if ema else "model"
    ckpt = tmp_path / "best.pth"
    torch.save(state, ckpt)
    assert export.main(["--ckpt", str(ckpt), "--out", str(tmp_path / "m.onnx")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["weights"] == state["best_source"]

    x = torch.rand(2, 3, VAL_SIZE, VAL_SIZE, generator=torch.Generator().manual_seed(0))
    got = export.OnnxModel(tmp_path / "m.onnx", ["CPUExecutionProvider"])(x)
    for source in ("model", "ema"):
        model = create_model("tresnet_tiny", num_classes=10, norm="bn")
        model.load_state_dict(state[source])
        with torch.no_grad():
            gap = (got - model.eval()(x)).abs().max().item()
        assert (gap <= TOLERANCE) == (source == state["best_source"]), (source, gap)


@pytest.mark.slow
def test_timm_and_official_files_with_model(tmp_path, randomize_norms):
    torch.manual_seed(0)
    model = randomize_norms(create_model("tresnet_tiny", num_classes=1000, norm="bn")).eval()
    official, _ = to_official(model)
    torch.save(model.state_dict(), tmp_path / "timm.pth")
    torch.save({"model": official}, tmp_path / "official.pth")
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for fmt in ("timm", "official"):
        out = tmp_path / f"{fmt}.onnx"
        assert export.main(["--ckpt", str(tmp_path / f"{fmt}.pth"), "--model", "tresnet_tiny",
                            "--out", str(out)]) == 0
        info = json.loads(out.with_suffix(".json").read_text())
        assert info["input_size"] == [3, 224, 224] and info["resize"] == 256  # the model's data config
        assert info["classes"][0] == "n01440764" and info["class_descriptions"][0].startswith("tench")
        if fmt == "timm":  # official weights act as |w| + eps: another model, compared in its own test
            with torch.no_grad():
                ref = model(x)
            assert (export.OnnxModel(out, ["CPUExecutionProvider"])(x) - ref).abs().max() <= TOLERANCE


@pytest.mark.skipif(not inplace_abn_available(), reason="inplace_abn is not installed (pip install "
                    "--no-build-isolation inplace-abn)")
def test_an_inplace_abn_model_exports_with_its_norms_folded(tmp_path, randomize_norms, capsys):
    torch.manual_seed(0)
    iabn = randomize_norms(create_model("tresnet_tiny", num_classes=10, norm="iabn")).eval()
    torch.save(iabn.state_dict(), tmp_path / "iabn.pth")  # what an InPlace-ABN run's weights are
    assert export.main(["--ckpt", str(tmp_path / "iabn.pth"), "--model", "tresnet_tiny",
                        "--img-size", "64", "--out", str(tmp_path / "m.onnx")]) == 0
    assert "norms: 14 of 14 folded" in capsys.readouterr().out
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = iabn(x)
    got = export.OnnxModel(tmp_path / "m.onnx", ["CPUExecutionProvider"])(x)
    assert (got - ref).abs().max() <= TOLERANCE


@pytest.mark.slow
def test_usage_errors_are_one_line_and_exit_2(tmp_path, run_dir, capsys):
    assert export.main(["--ckpt", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "m.onnx")]) == 2
    torch.save(create_model("tresnet_tiny", num_classes=10, norm="bn").state_dict(), tmp_path / "bare.pth")
    assert export.main(["--ckpt", str(tmp_path / "bare.pth"), "--out", str(tmp_path / "m.onnx")]) == 2
    assert export.main(["--ckpt", str(run_dir / "best.pth"), "--img-size", "100",
                        "--out", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("export.py: error: ") for line in err), err
    assert "missing.pth" in err[0] and "--model NAME" in err[1] and "multiple of 32" in err[2]

    (tmp_path / "lone.onnx").write_bytes(b"")
    data = str(real_photos("imagenette-mini-96"))
    assert validation.main(["--onnx", str(tmp_path / "lone.onnx"), "--data", data]) == 2
    assert validation.main(["--onnx", str(tmp_path / "lone.onnx"), "--data", data, "--ema"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "no lone.json beside it" in err[0] and "--ema/--no-ema: fixed in the ONNX file" in err[1]
