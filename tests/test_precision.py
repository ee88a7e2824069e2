"""What each GPU generation gets: `train.amp: auto` per compute capability (mocked here), a bf16 that a
GPU cannot run natively refused at preflight, and the speed choices named at start-up."""

import pytest
import torch

from tresnet_train.config import load_config
from tresnet_train.data.dali_backend import hardware_decoder_share
from tresnet_train.precision import Precision, PrecisionError, resolve_amp
from trainer_helpers import ROOT, tiny_overrides, train

GPUS = {"V100": (7, 0), "T4": (7, 5), "A100": (8, 0), "A10": (8, 6), "H100": (9, 0)}


@pytest.fixture
def gpu(monkeypatch):
    """`gpu(name)` makes torch report one CUDA device of that generation."""
    def use(name):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: GPUS[name])
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: f"NVIDIA {name}")
        return torch.device("cuda", 0)
    return use


@pytest.mark.parametrize("name, amp", [("V100", "fp16"), ("T4", "fp16"), ("A100", "bf16"),
                                       ("A10", "bf16"), ("H100", "bf16")])
def test_auto_picks_bf16_where_native_else_fp16(gpu, name, amp):
    assert resolve_amp("auto", gpu(name))[0] == amp


def test_cpu_auto_is_fp32():
    assert resolve_amp("auto", torch.device("cpu"))[0] == "none"


def test_fp16_gets_a_loss_scaler_bf16_none(gpu):
    device = gpu("V100")
    assert resolve_amp("fp16", device) == ("fp16", "as configured")
    assert Precision("fp16", torch.device("cpu")).scaler.is_enabled()
    assert not Precision("bf16", torch.device("cpu")).scaler.is_enabled()


@pytest.mark.parametrize("name", ["V100", "T4"])
def test_explicit_bf16_without_native_bf16_is_refused(gpu, name):
    with pytest.raises(PrecisionError, match=rf"NVIDIA {name} \(compute capability 7\.\d\).*"
                                             r"train.amp=auto"):
        resolve_amp("bf16", gpu(name))


def test_preflight_refuses_bf16_on_a_v100(gpu, tmp_path):
    from tresnet_train.config import ConfigError
    from tresnet_train.trainer import preflight
    gpu("V100")
    cfg = load_config(ROOT / "configs" / "demo.yaml", ["train.amp=bf16",
                                                       f"run.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="'train.amp' is bf16 but NVIDIA V100"):
        preflight(cfg)


@pytest.mark.parametrize("name, share", [("V100", 0.0), ("A10", 0.0), ("A100", 0.65),
                                         ("H100", 0.65)])
def test_hardware_jpeg_decoder_share_only_where_there_is_one(gpu, name, share):
    assert hardware_decoder_share(gpu(name)) == share
    assert hardware_decoder_share(torch.device("cpu")) == 0.0


@pytest.mark.slow
def test_start_up_line_names_the_device_and_every_speed_choice(reference):
    """Read from the shared tiny run's output (conftest.py): train.py's defaults on CPU."""
    line = next(line for line in reference.proc.stdout.splitlines() if "speed:" in line)
    for needle in ("on CPU", "precision none (CPU", "TF32 off", "cudnn.benchmark off",
                   "channels_last off", "compile off", "norm BatchNorm", "sync off", "host memory: "):
        assert needle in line, line


@pytest.mark.slow
def test_fp16_with_loss_scaling_resumes_exactly_with_its_scaler_state(tmp_path, digits):
    """fp16 autocast + GradScaler on CPU with BatchNorm: the scaler's state is in every checkpoint,
    and a run stopped mid-epoch and resumed ends with the weights of an uninterrupted one."""
    import os
    import signal

    from trainer_helpers import assert_same_weights, load, start_train, wait_for_step
    fp16 = {"train.amp": "fp16", "model.norm": "bn", "run.ckpt_every_steps": 1}
    reference = train(tiny_overrides(tmp_path / "reference", digits, **fp16))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "run"
    proc = start_train(tiny_overrides(out, digits, **fp16))
    wait_for_step(out / "last.pth", 4, proc)
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=900) == 75
    scaler = load(out / "last.pth")["scaler"]
    assert scaler["scale"] > 0 and "_growth_tracker" in scaler
    resumed = train(tiny_overrides(out, digits, **fp16))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(load(out / "last.pth"), load(tmp_path / "reference" / "last.pth"))
    assert load(out / "last.pth")["scaler"] == load(tmp_path / "reference" / "last.pth")["scaler"]
