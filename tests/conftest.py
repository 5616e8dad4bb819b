import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("OMP_NUM_THREADS", "2")
SHARED = Path(__file__).resolve().parents[2] / "shared"
DATA = Path(os.environ.get("ROADCASCADE_DATA", SHARED / "data/streetwork"))


def jpeg_bytes(rgb: np.ndarray, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def random_image(rng: np.random.Generator, h: int = 48, w: int = 64) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


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
