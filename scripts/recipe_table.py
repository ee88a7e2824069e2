"""Write the README's recipe table from the `published:` blocks of configs/*.yaml.

    python scripts/recipe_table.py           # rewrite the table in README.md
    python scripts/recipe_table.py --check   # exit 1 if README.md's table is not current

Each row: the config, what it trains, its epochs, the expected top-1 with its eval protocol, the
source it follows and the settings where it departs from that source (the reasons are in the
config's `published.differences`).
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout, uninstalled
from tresnet_train.recipes import render_readme  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that README.md is current")
    args = parser.parse_args()
    readme = ROOT / "README.md"
    text = readme.read_text()
    new = render_readme(text, ROOT / "configs")
    if args.check:
        if new != text:
            print("README.md's recipe table is out of date: run python scripts/recipe_table.py")
            return 1
        print("README.md's recipe table is current")
        return 0
    readme.write_text(new)
    print(f"wrote the recipe table of {readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
