"""Each shipped recipe against its `published:` block, and the README's table generated from them."""
from pathlib import Path

import pytest
import yaml

from tresnet_train.config import load_config
from tresnet_train.recipes import drift, read_published, render_readme

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS)
def test_recipe_matches_its_published_block_or_says_why_not(config):
    block = read_published(ROOT / "configs" / config)
    assert block["source"] and block["expected"]
    assert drift(ROOT / "configs" / config) == []


def write_recipe(tmp_path, settings: dict, differences: dict, **config) -> Path:
    data = {"data": {"root": "/d"}, **config,
            "published": {"recipe": "r", "source": "s", "expected": "e", "settings": settings,
                          "differences": differences}}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_drift_names_each_unexplained_difference_and_each_stale_reason(tmp_path):
    path = write_recipe(
        tmp_path,
        settings={"optim.lr": 0.6, "train.ema": True, "data.scale": [0.08, 1.0], "optim.warmup_epochs": 3,
                  "data.cutout": 0.5, "data.lighting_before_crop": False},
        differences={"train.ema": "kept", "data.hflip": "no setting"},
        optim={"lr": 0.1, "warmup_epochs": 3.002})  # within 0.1%: the same number
    problems = "\n".join(drift(path))
    assert "optim.lr is 0.1 but the source states 0.6" in problems
    assert "train.ema matches the source (True) but published.differences.train.ema" in problems
    assert "data.cutout is no such key in the framework but the source states 0.5" in problems
    assert "published.differences.data.hflip names no setting" in problems
    # 3.002 is 3 to 0.1%; an ingredient the framework lacks matches a source that leaves it off
    assert "warmup" not in problems and "scale" not in problems and "before_crop" not in problems
    assert len(drift(path)) == 4


def test_published_block_is_no_config_key_and_not_inherited(tmp_path):
    base = write_recipe(tmp_path, {"optim.lr": 0.1}, {}, optim={"lr": 0.1})
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {base.name}\noptim:\n  lr: 0.2\n")
    assert load_config(child).optim.lr == 0.2  # the base's block is neither an error nor a setting
    with pytest.raises(Exception, match="no 'published:' mapping|expected a 'published:' mapping"):
        read_published(child)


def test_readme_recipe_table_is_generated_from_the_blocks():
    readme = (ROOT / "README.md").read_text()
    assert render_readme(readme, ROOT / "configs") == readme, \
        "README.md's recipe table is stale: run python scripts/recipe_table.py"
    for config in CONFIGS:
        assert f"| `configs/{config}` |" in readme
