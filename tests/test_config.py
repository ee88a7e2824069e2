"""The config contract: strict keys and types, bases, overrides, clear exit-2 errors in seconds."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tresnet_train.config import Config, ConfigError, from_dict, load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


def write(path: Path, data) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def test_defaults_and_overrides(tmp_path):
    cfg = load_config(None, ["data.root=/data/x", "optim.lr=0.3", "train.epochs=5",
                             "data.scale=[0.2, 1.0]", "model.pretrained=none"])
    assert cfg.optim.lr == 0.3 and isinstance(cfg.optim.lr, float)
    assert cfg.train.epochs == 5 and cfg.data.scale == [0.2, 1.0]
    assert cfg.model.pretrained is None


def test_base_chain_merges_and_child_wins(tmp_path):
    write(tmp_path / "a.yaml", {"optim": {"lr": 0.5, "weight_decay": 0.01}, "data": {"root": "/d"}})
    write(tmp_path / "b.yaml", {"base": "a.yaml", "optim": {"lr": 0.2}})
    cfg = load_config(tmp_path / "b.yaml")
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.data.root) == (0.2, 0.01, "/d")


@pytest.mark.parametrize("override, needle", [
    ("optim.lrr=1", "unknown config key 'optim.lrr'; did you mean lr"),
    ("optim.lr=fast", "config key 'optim.lr': expected float"),
    ("optim.lr=-0.1", "'optim.lr': must be > 0"),
    ("data.batch_size=0", "'data.batch_size': must be > 0"),
    ("data.batch_size=1.5", "'data.batch_size': expected int"),
    ("run.dist_timeout_min=0", "'run.dist_timeout_min': must be > 0"),
    ("data.backend=fast", "'data.backend': invalid value 'fast' (valid: auto, dali, torch)"),
    ("train.ema=maybe", "'train.ema': expected bool"),
    ("optim=3", "'optim': expected a mapping"),
    ("nonsense", "not of the form section.key=value"),
    ("train.report=best", "'train.report': invalid value 'best' (valid: auto, model, ema)"),
    ("data.train_interpolation=lanczos", "'data.train_interpolation': invalid value 'lanczos'"),
    ("model.drop_block_rate=0.1", "DropBlock is built into the ResNeSt models only, not tresnet_m"),
    ("optim.cooldown_epochs=300", "'optim.cooldown_epochs' is 300, not shorter than train.epochs=300"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.root=/d", override])
    assert needle in str(e.value)


@pytest.mark.parametrize("overrides, needle", [
    (["train.ema=false", "train.report=ema"], "'train.report' is ema but train.ema is false"),
    (["optim.schedule=step", "optim.lr_per_epoch=true"],
     "'optim.lr_per_epoch' is true but optim.schedule is step"),
])
def test_settings_that_contradict_each_other_name_both_keys(overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, ["data.root=/d", *overrides])
    assert needle in str(e.value)


def test_missing_root_and_base_cycle(tmp_path):
    with pytest.raises(ConfigError, match="'data.root' is empty"):
        load_config(None, [])
    write(tmp_path / "a.yaml", {"base": "b.yaml"})
    write(tmp_path / "b.yaml", {"base": "a.yaml"})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_python_tags_are_refused(tmp_path):
    marker = tmp_path / "ran"
    path = write(tmp_path / "evil.yaml",
                 f"model: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="not valid \\(safe\\) YAML"):
        load_config(path)
    assert not marker.exists()


def test_round_trip_through_plain_data():
    cfg = load_config(None, ["data.root=/d", "optim.name=lamb"])
    again = from_dict(yaml.safe_load(yaml.safe_dump(to_dict(cfg))))
    assert again == cfg and isinstance(again, Config)


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_loads(config, tmp_path):
    # Fine-tuning configs name the 224 run's best.pth, which exists only after that run.
    start = tmp_path / "best.pth"
    start.write_bytes(b"")
    cfg = load_config(ROOT / "configs" / config, [f"model.init_from={start}"])
    assert cfg.model.name


@pytest.mark.slow
def test_cli_exits_2_on_bad_config_before_building_anything(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--config", "configs/demo.yaml",
                           "optim.lrr=1", f"run.output_dir={tmp_path / 'run'}"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)  # a hang guard, not a pace
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("config error: unknown config key 'optim.lrr'")
    assert not (tmp_path / "run").exists()


def test_exponent_without_a_dot_is_a_float_in_files_and_overrides(tmp_path):
    """YAML 1.1 (PyYAML) reads `5e-5` as a string; configs read it as the float a user means."""
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  weight_decay: 5e-5\n  lr: 1E-1\ndata:\n  root: /data\n")
    cfg = load_config(path)
    assert cfg.optim.weight_decay == 5e-5 and cfg.optim.lr == 0.1
    assert load_config(path, ["optim.weight_decay=2e-5"]).optim.weight_decay == 2e-5
    assert load_config(path, ["run.output_dir=1e5x"]).run.output_dir == "1e5x"  # not a number


def test_each_choice_list_serves_config_command_lines_and_messages():
    import re

    from tresnet_train import config
    from tresnet_train.validation import build_parser
    for key, valid in config.CHOICES.items():
        with pytest.raises(ConfigError, match=re.escape(f"'{key}': invalid value 'bogus' (valid: "
                                                        f"{', '.join(valid)})")):
            load_config(None, [f"{key}=bogus"])
        section, name = key.split(".")
        for value in valid:
            cfg = load_config(None, ["data.root=images", f"{key}={value!r}"])
            assert getattr(getattr(cfg, section), name) == value
    choices = {a.dest: a.choices for a in build_parser()._actions}
    assert (choices["backend"], choices["amp"], choices["device"]) == (
        config.BACKENDS, config.AMP_MODES, config.DEVICES)
    assert config.BACKENDS == ("auto", *config.DECODERS)
