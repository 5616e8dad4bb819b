"""GPU JPEG decoder probe: torchvision's nvJPEG batch decode against nvImageCodec's backends, on one GPU.

Measures images/s of decoding alone (bytes in host memory -> uint8 RGB tensors on the GPU, synchronised)
at a fixed batch size, for each decoder set-up, on the same images; also the pixel difference against
PIL (libjpeg-turbo) and whether threads each running a decoder add up (i.e. the decoder releases the GIL).

    PYTHONPATH=.carry_nv python3 scripts/decode_probe.py --images .carry_gpu/q75 --json $OUT/probe.json

nvImageCodec (``nvidia-nvimgcodec-cu13``) is optional: without it only torchvision's rows are measured.
"""

from __future__ import annotations

import argparse
import io
import json
import threading
import time
from pathlib import Path

import numpy as np
import torch


def load(folder: str, n: int) -> list[bytes]:
    files = sorted(Path(folder).glob("*.jp*g"))[:n]
    if not files:
        raise SystemExit(f"no JPEG files in {folder}")
    return [f.read_bytes() for f in files]


def batches(data: list[bytes], b: int, n_batches: int) -> list[list[bytes]]:
    out, i = [], 0
    for _ in range(n_batches):
        out.append([data[(i + j) % len(data)] for j in range(b)])
        i += b
    return out


def timed(fn, bs: list[list[bytes]], warm: int = 2) -> float:
    for b in bs[:warm]:
        fn(b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    n = 0
    for b in bs:
        fn(b)
        n += len(b)
    torch.cuda.synchronize()
    return n / (time.perf_counter() - t0)


def tv_decode(b: list[bytes]) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg([torch.frombuffer(x, dtype=torch.uint8) for x in b], mode=ImageReadMode.RGB, device="cuda")


def make_nv(kind: str, threads: int, options: str = "", fmt: str = "P_RGB"):
    from nvidia import nvimgcodec as nv

    K = nv.BackendKind
    sets = {
        "hw": [nv.Backend(K.HW_GPU_ONLY)],
        "hw+hybrid": [nv.Backend(K.HW_GPU_ONLY), nv.Backend(K.HYBRID_CPU_GPU)],
        "hw0.7+hybrid": [nv.Backend(K.HW_GPU_ONLY, load_hint=0.7), nv.Backend(K.HYBRID_CPU_GPU)],
        "hw0.7+cpu": [nv.Backend(K.HW_GPU_ONLY, load_hint=0.7), nv.Backend(K.CPU_ONLY)],
        "hybrid": [nv.Backend(K.HYBRID_CPU_GPU)],
        "gpu": [nv.Backend(K.GPU_ONLY)],
        "cpu": [nv.Backend(K.CPU_ONLY)],
        "all": None,
    }
    dec = nv.Decoder(device_id=0, max_num_cpu_threads=threads, backends=sets[kind], options=options)
    params = nv.DecodeParams(apply_exif_orientation=False, color_spec=nv.ColorSpec.SRGB,
                             sample_format=getattr(nv.SampleFormat, fmt))
    stream = torch.cuda.current_stream().cuda_stream

    def run(b: list[bytes]) -> list[torch.Tensor]:
        imgs = dec.decode(b, params=params, cuda_stream=stream)
        return [torch.as_tensor(im.cuda(), device="cuda") if im is not None else None for im in imgs]

    return run


def pixel_diff(fn, data: list[bytes]) -> dict:
    from PIL import Image

    out = fn(data)
    d = []
    for x, t in zip(data, out):
        ref = np.asarray(Image.open(io.BytesIO(x)).convert("RGB")).astype(np.int16)
        a = t.cpu().numpy()
        if a.shape[0] == 3 and a.shape[-1] != 3:
            a = a.transpose(1, 2, 0)
        if a.shape != ref.shape:
            return {"shape_mismatch": [list(a.shape), list(ref.shape)]}
        d.append(np.abs(a.astype(np.int16) - ref))
    d = np.concatenate([x.ravel() for x in d])
    return {"mean_abs": float(d.mean()), "max_abs": int(d.max())}


def threaded(make, n_threads: int, bs: list[list[bytes]]) -> float:
    fns = [make() for _ in range(n_threads)]
    for f in fns:
        f(bs[0])
    torch.cuda.synchronize()
    parts = [bs[i::n_threads] for i in range(n_threads)]

    def work(f, part):
        with torch.cuda.stream(torch.cuda.Stream()):
            for b in part:
                f(b)
            torch.cuda.current_stream().synchronize()

    ts = [threading.Thread(target=work, args=(f, p)) for f, p in zip(fns, parts)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sum(len(b) for b in bs) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", required=True)
    ap.add_argument("--n", type=int, default=800)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--batches", type=int, default=24)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    data = load(a.images, a.n)
    bs = batches(data, a.batch, a.batches)
    res: dict = {"n_images": len(data), "mean_kb": float(np.mean([len(x) for x in data]) / 1024), "batch": a.batch}
    print(f"{len(data)} images, mean {res['mean_kb']:.1f} kB, batch {a.batch}", flush=True)
    res["torchvision"] = {"img_s": timed(tv_decode, bs), "diff": pixel_diff(tv_decode, data[:64])}
    print("torchvision", res["torchvision"], flush=True)
    for n_t in (2, 3, 4):
        res[f"torchvision_{n_t}threads"] = threaded(lambda: tv_decode, n_t, bs)
        print(f"torchvision {n_t} threads", res[f"torchvision_{n_t}threads"], flush=True)
    try:
        from nvidia import nvimgcodec

        res["nvimgcodec_version"] = nvimgcodec.__version__
    except Exception as e:  # noqa: BLE001
        res["nvimgcodec_error"] = repr(e)
        print("no nvimgcodec:", e)
    else:
        for kind, th in [("hw", 4), ("hw", 16), ("all", 16), ("hw+hybrid", 16), ("hw0.7+hybrid", 16),
                         ("hw0.7+cpu", 16), ("hybrid", 16), ("cpu", 16), ("cpu", 8)]:
            key = f"nv_{kind}_t{th}"
            try:
                fn = make_nv(kind, th)
                r = {"img_s": timed(fn, bs), "diff": pixel_diff(fn, data[:64])}
                # batch-1 latency
                lat = []
                for x in data[:100]:
                    t0 = time.perf_counter()
                    fn([x])
                    torch.cuda.synchronize()
                    lat.append((time.perf_counter() - t0) * 1e3)
                r["b1_p50_ms"] = float(np.percentile(lat[10:], 50))
                r["b1_p99_ms"] = float(np.percentile(lat[10:], 99))
            except Exception as e:  # noqa: BLE001
                r = {"error": repr(e)}
            res[key] = r
            print(key, r, flush=True)
        for kind, n_t, th in [("hw", 2, 8), ("hw", 3, 5), ("hw0.7+hybrid", 2, 8), ("all", 2, 8)]:
            key = f"nv_{kind}_{n_t}threads_t{th}"
            try:
                res[key] = threaded(lambda: make_nv(kind, th), n_t, bs)
            except Exception as e:  # noqa: BLE001
                res[key] = repr(e)
            print(key, res[key], flush=True)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
