"""Fit the simulator's sleep-stage model to the PSG hypnograms and write stage_model.json.

The data folder comes from BANDGATE_DATA (default ../shared/data, relative to the repo root);
only the fitted parameters are written to the repo, never the hypnograms. The output is
deterministic, so a test can check that the committed JSON is what this script produces.

    python scripts/fit_stage_model.py [--check]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a plain script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

from gateway.simulator import stage_model  # noqa: E402

HYPNOGRAM_SUBDIR = Path("sleep/psg_hypnograms")


def data_folder() -> Path:
    """The hypnogram folder: $BANDGATE_DATA/sleep/psg_hypnograms, relative paths from the repo root."""
    return REPO_ROOT / os.environ.get("BANDGATE_DATA", "../shared/data") / HYPNOGRAM_SUBDIR


def fitted_json(folder: Path) -> str:
    """The JSON text the committed model file should hold, fitted from `folder`."""
    return stage_model.dumps_model(stage_model.fit_stage_model(stage_model.read_hypnograms(folder)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed JSON, write nothing")
    args = parser.parse_args(argv)
    folder = data_folder()
    if not folder.is_dir():
        print(f"hypnogram folder {folder} not found; set BANDGATE_DATA", file=sys.stderr)
        return 2
    text = fitted_json(folder)
    if args.check:
        same = stage_model.MODEL_PATH.read_text() == text
        print("stage_model.json is up to date" if same else "stage_model.json differs from the fit")
        return 0 if same else 1
    stage_model.MODEL_PATH.write_text(text)
    print(f"wrote {stage_model.MODEL_PATH.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
