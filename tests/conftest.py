import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import jpeg, random_image  # noqa: E402,F401  (random_image: re-exported for the tests)

os.environ.setdefault("OMP_NUM_THREADS", "2")
SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = Path(os.environ.get("ROADCASCADE_DATA", SHARED / "data/streetwork"))


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    return jpeg(rgb, quality)


@pytest.fixture
def streetwork() -> Path:
    if not (DATA / "manifest.csv").exists():
        pytest.skip(f"StreetWork data not found at {DATA}")
    return DATA


@pytest.fixture
def folder_dataset(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for cls, n in (("roadwork", 3), ("none", 4)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            Image.fromarray(random_image(rng)).save(tmp_path / cls / f"{i}.png")
    (tmp_path / "none" / "notes.txt").write_text("not an image")
    return tmp_path
