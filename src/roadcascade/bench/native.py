"""Native-resolution requests on the CPU path (issue #12): phone-sized JPEG payloads made from real photos, and
what the reduced-size decode (``images.decode_bytes(..., min_size=...)``, libjpeg's DCT scaling) changes.

Since the subnet's 2026-05-03 revision, images arrive at their native size (phone photos, up to 4032x3024).
The stage-1 model only needs its input size, so decoding a 12-megapixel JPEG in full and then shrinking it is
mostly wasted work; :func:`compare_decodes` measures, on the same payloads, how far the answers move when the
decoder does the shrinking instead (decision agreement, mean and max ``|dp|``), and :func:`bench_decode` how much
faster it is (decode only, and decode + the cascade end to end).

Test payloads: StreetWork's photos are small (short side 224), so native-sized ones are made by upscaling real
photos (bicubic) to a fixed size and encoding them as JPEG q90 (:func:`upscaled_jpeg`). Upscaled photos hold no
detail finer than the original's pixels, so agreement measured on them is an optimistic proxy for genuine
phone photos; the speed numbers do not depend on that (JPEG decode cost follows the pixel count and the
entropy-coded size).
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..io.images import decode_bytes, decode_path

__all__ = [
    "NATIVE_SIZES",
    "Agreement",
    "DecodeBench",
    "upscaled_jpeg",
    "native_payloads",
    "photo_paths",
    "compare_decodes",
    "bench_decode",
]

#: (width, height) of the payload sets: a 1080p frame and a 12-megapixel 4:3 phone photo
NATIVE_SIZES: tuple[tuple[int, int], ...] = ((1920, 1080), (4032, 3024))


def upscaled_jpeg(rgb: np.ndarray, size: tuple[int, int], quality: int = 90) -> bytes:
    """``rgb`` resized to ``size`` = (width, height) (PIL bicubic; the aspect ratio follows ``size``) as JPEG bytes."""
    w, h = size
    if w < 1 or h < 1:
        raise ValueError(f"size must be positive, got {size!r}")
    img = Image.fromarray(np.ascontiguousarray(rgb)).resize((int(w), int(h)), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=int(quality))
    return buf.getvalue()


def photo_paths(folder: Path, n: int) -> list[Path]:
    """``n`` JPEG files of ``folder``, evenly spread over its sorted listing (every source, not the first one)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in (".jpg", ".jpeg") and p.is_file())
    if not files:
        raise FileNotFoundError(f"no JPEG files in {folder}")
    if n >= len(files):
        return files
    idx = np.linspace(0, len(files) - 1, n).round().astype(int)
    return [files[i] for i in sorted(set(idx.tolist()))]


def native_payloads(photos: Sequence[np.ndarray | Path], sizes: Sequence[tuple[int, int]] = NATIVE_SIZES,
                    quality: int = 90) -> dict[str, list[bytes]]:
    """One payload set per size, named ``"<w>x<h>"``: every photo upscaled to that size, JPEG at ``quality``."""
    arrays = [decode_path(p) if isinstance(p, Path) else p for p in photos]
    return {f"{w}x{h}": [upscaled_jpeg(a, (w, h), quality) for a in arrays] for w, h in sizes}


@dataclass(frozen=True)
class Agreement:
    """Full vs reduced decode through the same cascade: ``agreement`` = share of equal decisions (``p > 0.5``),
    ``mean_abs_dp`` / ``max_abs_dp`` over the folded probabilities."""

    n: int
    min_size: int | None
    agreement: float
    mean_abs_dp: float
    max_abs_dp: float
    flips: int

    def as_dict(self) -> dict:
        return asdict(self)


def _probs(cascade, payloads: Sequence[bytes], min_size: int | None, batch: int = 16) -> np.ndarray:
    out: list[float] = []
    for i in range(0, len(payloads), batch):
        out += [p.probability for p in cascade.predict([decode_bytes(b, min_size=min_size) for b in payloads[i:i + batch]])]
    return np.array(out, dtype=np.float64)


def agreement_of(full: np.ndarray, reduced: np.ndarray, min_size: int | None) -> Agreement:
    """The :class:`Agreement` of two probability vectors (the same payloads)."""
    full, reduced = np.asarray(full, np.float64), np.asarray(reduced, np.float64)
    if full.shape != reduced.shape or full.ndim != 1 or not len(full):
        raise ValueError(f"need two equal, non-empty probability vectors, got {full.shape} and {reduced.shape}")
    same = (full > 0.5) == (reduced > 0.5)
    dp = np.abs(full - reduced)
    return Agreement(n=int(len(full)), min_size=min_size, agreement=float(same.mean()), mean_abs_dp=float(dp.mean()),
                     max_abs_dp=float(dp.max()), flips=int((~same).sum()))


def compare_decodes(cascade, payloads: Sequence[bytes], min_size: int | None = None) -> Agreement:
    """Answers of ``cascade`` on ``payloads`` decoded in full vs with ``min_size`` (default: the cascade's
    ``decode_size()``)."""
    m = cascade.decode_size() if min_size is None else min_size
    return agreement_of(_probs(cascade, payloads, None), _probs(cascade, payloads, m), m)


@dataclass(frozen=True)
class DecodeBench:
    """One payload set: images per second (single process, same run) for decode only and decode + cascade,
    full vs reduced decode, and the agreement of the answers."""

    name: str
    n: int
    mean_bytes: float
    min_size: int | None
    decoded_shape_reduced: tuple[int, int]
    decode_full_img_s: float
    decode_reduced_img_s: float
    e2e_full_img_s: float
    e2e_reduced_img_s: float
    agreement: Agreement
    # another bundle (e.g. the fp32 PyTorch form before an ONNX export, or yesterday's release) on full-size decodes in
    # the same rounds: "the CPU path as it was" against this bundle with reduced decodes; None when not asked for
    e2e_reference_full_img_s: float | None = None
    reference_agreement: Agreement | None = None

    @property
    def decode_speedup(self) -> float:
        return self.decode_reduced_img_s / self.decode_full_img_s

    @property
    def e2e_speedup(self) -> float:
        return self.e2e_reduced_img_s / self.e2e_full_img_s

    @property
    def e2e_speedup_vs_reference(self) -> float | None:
        """End to end, this bundle with reduced decodes over the reference bundle with full ones."""
        return None if self.e2e_reference_full_img_s is None else self.e2e_reduced_img_s / self.e2e_reference_full_img_s

    def as_dict(self) -> dict:
        d = asdict(self)
        d["decode_speedup"], d["e2e_speedup"] = self.decode_speedup, self.e2e_speedup
        d["e2e_speedup_vs_reference"] = self.e2e_speedup_vs_reference
        return d


def _rates(fns: dict[str, Callable[[], int]], repeats: int) -> dict[str, float]:
    """Images per second of each ``fn`` (returns how many images it did): the best of ``repeats`` rounds, the
    functions interleaved within each round (a busy neighbour slows them alike)."""
    best = dict.fromkeys(fns, 0.0)
    for _ in range(max(1, repeats)):
        for key, fn in fns.items():
            t0 = time.perf_counter()
            k = fn()
            best[key] = max(best[key], k / (time.perf_counter() - t0))
    return best


def bench_decode(cascade, name: str, payloads: Sequence[bytes], repeats: int = 2, batch: int = 16,
                 log: Callable[[str], None] | None = None, reference=None) -> DecodeBench:
    """Time full vs reduced decode (``cascade.decode_size()``) on ``payloads``, alone and with the cascade
    (batches of ``batch``, decode then predict, one thread of control), interleaved in one run; then the
    agreement of the answers. With ``reference`` (another cascade), also that cascade end to end on full-size
    decodes in the same rounds, and the agreement of its answers with this cascade's on reduced decodes."""
    m = cascade.decode_size()
    if m is None:
        raise ValueError("the cascade needs full-size images (a tier has no decode size): nothing to reduce")

    def decode(min_size: int | None) -> int:
        for b in payloads:
            decode_bytes(b, min_size=min_size)
        return len(payloads)

    def e2e(min_size: int | None, model=cascade) -> int:
        for i in range(0, len(payloads), batch):
            model.predict([decode_bytes(b, min_size=min_size) for b in payloads[i:i + batch]])
        return len(payloads)

    fns = {"decode full": lambda: decode(None), "decode reduced": lambda: decode(m),
           "e2e full": lambda: e2e(None), "e2e reduced": lambda: e2e(m)}
    if reference is not None:
        fns["e2e reference full"] = lambda: e2e(None, reference)
        e2e(m, reference)  # warm it
    e2e(m)  # warm the model
    rates = _rates(fns, repeats)
    if log:
        log(f"{name}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in rates.items()))
    reduced = _probs(cascade, payloads, m)  # once: both agreements compare against it
    agree = agreement_of(_probs(cascade, payloads, None), reduced, m)
    ref_agree = agreement_of(_probs(reference, payloads, None), reduced, m) if reference is not None else None
    shape = decode_bytes(payloads[0], min_size=m).shape[:2]
    return DecodeBench(name=name, n=len(payloads), mean_bytes=float(np.mean([len(b) for b in payloads])), min_size=m,
                       decoded_shape_reduced=(int(shape[0]), int(shape[1])),
                       decode_full_img_s=rates["decode full"], decode_reduced_img_s=rates["decode reduced"],
                       e2e_full_img_s=rates["e2e full"], e2e_reduced_img_s=rates["e2e reduced"], agreement=agree,
                       e2e_reference_full_img_s=rates.get("e2e reference full"), reference_agreement=ref_agree)
