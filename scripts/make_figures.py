"""The README's figures, regenerated from a pipeline run (`python scripts/run_pipeline.py` first).

    python scripts/make_figures.py                      # reads training/, writes images/
    python scripts/make_figures.py --from /tmp/run --to images

Writes `course_curves.png` (every stage's headline curve in one figure) and copies each stage's
curves from `<from>/plots/` as `stage_<name>.png`.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from trainer.lib.curves import plot_course


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", default="training", help="a pipeline's --out_dir (default: training)")
    p.add_argument("--to", default="images", help="where the figures go (default: images)")
    args = p.parse_args(argv)
    source, target = Path(args.source), Path(args.to)
    if not (source / "report.json").is_file():
        p.error(f"{source} has no report.json: run python scripts/run_pipeline.py --out_dir {source} first")
    made = [plot_course(source, target / "course_curves.png")]
    for png in sorted((source / "plots").glob("*.png")):
        made.append(Path(shutil.copyfile(png, target / f"stage_{png.name}")))
    for path in filter(None, made):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
