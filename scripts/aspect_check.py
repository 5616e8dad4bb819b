"""How a bundle's answers on the portrait night-dev frames depend on how a non-square frame is made square:
stretched (what the runtime does), centre-cropped, upper-centre-cropped or padded, or pooled (max, mean)
over three aspect-preserving squares along the long side; against the real dashcam negatives of test
treated the same way. The last lines give recall and FPR at lower thresholds of the max-pooled score:
they are read on the evaluation sets themselves, so they show the ranking, not a deployable threshold.

    python scripts/aspect_check.py BUNDLE
"""

import sys

import numpy as np

from roadcascade.cascade.bundle import Bundle
from roadcascade.io.data import open_dataset
from roadcascade.metrics import auroc
from roadcascade.bench.realcam import dashcam_negatives, default_night_dev


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


def squares(im: np.ndarray, k: int = 3) -> list[np.ndarray]:
    """``k`` squares of side min(h, w) spread evenly along the long side (aspect ratio kept)."""
    h, w = im.shape[:2]
    s = min(h, w)
    if h > w:
        return [im[int(y) : int(y) + s] for y in np.linspace(0, h - s, k)]
    return [im[:, int(x) : int(x) + s] for x in np.linspace(0, w - s, k)]


def pooled(b: Bundle, ims: list[np.ndarray], k: int = 3) -> np.ndarray:
    """(n, k) probabilities of the ``k`` squares of each image."""
    flat = [c for im in ims for c in squares(im, k)]
    return np.array([p.probability for p in b.cascade.predict(flat)]).reshape(len(ims), k)


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
    c1, c0 = pooled(b, pos), pooled(b, neg)
    y = np.r_[np.ones(len(c1)), np.zeros(len(c0))]
    for name, a1, a0 in (("max of 3 sq", c1.max(1), c0.max(1)), ("mean of 3 sq", c1.mean(1), c0.mean(1))):
        print(f"{name:12s} night-dev recall {np.mean(a1 > 0.5):.3f}  dashcam FPR {np.mean(a0 > 0.5):.3f}  "
              f"median p {np.median(a1):.3f}  joint AUROC {auroc(y, np.r_[a1, a0]):.3f}")
    a1, a0 = c1.max(1), c0.max(1)
    print("max of 3 sq at lower thresholds (read on these sets: ranking only): " + "  ".join(
        f"t={t}: {np.mean(a1 > t):.3f}/{np.mean(a0 > t):.3f}" for t in (0.3, 0.2, 0.1, 0.05)) + "  (recall/FPR)")


if __name__ == "__main__":
    main()
