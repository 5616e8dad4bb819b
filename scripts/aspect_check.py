"""How a bundle's answers on the portrait night-dev frames depend on how a non-square frame is made square:
stretched (what the runtime does), centre-cropped, upper-centre-cropped or padded; against the real dashcam
negatives of test treated the same way.

    python scripts/aspect_check.py BUNDLE
"""

import sys

import numpy as np

from roadcascade.bundle import Bundle
from roadcascade.data import open_dataset
from roadcascade.metrics import auroc
from roadcascade.realcam import dashcam_negatives, default_night_dev


def crop_square(im: np.ndarray, where: float = 0.5) -> np.ndarray:
    h, w = im.shape[:2]
    s = min(h, w)
    y, x = int((h - s) * where), (w - s) // 2
    return im[y : y + s, x : x + s]


def pad_square(im: np.ndarray) -> np.ndarray:
    h, w = im.shape[:2]
    s = max(h, w)
    out = np.zeros((s, s, 3), np.uint8)
    out[(s - h) // 2 : (s - h) // 2 + h, (s - w) // 2 : (s - w) // 2 + w] = im
    return out


def main() -> None:
    b = Bundle.load(sys.argv[1])
    pos = [s.load() for s in open_dataset(default_night_dev()).samples]
    neg = [s.load() for s in dashcam_negatives(open_dataset(None, "test")).samples]
    for name, f in (("stretch", lambda x: x), ("centre-crop", crop_square), ("upper-crop", lambda x: crop_square(x, 0.25)),
                    ("pad", pad_square)):
        p1 = np.array([p.probability for p in b.cascade.predict([f(x) for x in pos])])
        p0 = np.array([p.probability for p in b.cascade.predict([f(x) for x in neg])])
        y = np.r_[np.ones(len(p1)), np.zeros(len(p0))]
        print(f"{name:12s} night-dev recall {np.mean(p1 > 0.5):.3f}  dashcam FPR {np.mean(p0 > 0.5):.3f}  "
              f"median p {np.median(p1):.3f}  joint AUROC {auroc(y, np.r_[p1, p0]):.3f}")


if __name__ == "__main__":
    main()
