"""Decode processes (roadcascade.accel.procdecode): the CPU path's pixels and errors, from worker processes,
through shared memory; and the GPU runtime using them (on the CPU here) giving Cascade.predict's answers."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from roadcascade.accel.runtime import GpuCascade, GpuConfig
from roadcascade.io.images import BadImage, DecodeLimits, decode_bytes, encode_jpeg
from roadcascade.models.preprocess import resize_square
from roadcascade.accel.procdecode import DecodeProcs, decode_rows

from test_gpu import _payloads, _smooth, _tiny_cascade


def _expected(payload: bytes, sizes, limits=DecodeLimits()):
    try:
        img = decode_bytes(payload, limits)
    except BadImage as e:
        return e
    return [resize_square(img, s) for s in sizes]


@pytest.fixture(scope="module")
def procs():
    with DecodeProcs(2, (32, 40), pin=False, ring=3, chunk=3) as p:
        yield p


def _mixed(rng: np.random.Generator) -> list[bytes]:
    payloads, _ = _payloads(rng)
    big = io.BytesIO()
    Image.fromarray(_smooth(rng, 90, 30)).save(big, format="WEBP")
    return payloads + [big.getvalue(), b"", encode_jpeg(_smooth(rng, 33, 33), 90)]


def test_pixels_and_errors_are_the_cpu_paths(procs):
    payloads = _mixed(np.random.default_rng(0))
    pb = procs.decode(payloads, device="cpu")
    assert pb.n == len(payloads) and pb.redone == 0
    n_bad = 0
    for j, p in enumerate(payloads):
        want = _expected(p, (32, 40))
        if isinstance(want, BadImage):
            n_bad += 1
            assert isinstance(pb.errors.get(j), BadImage) and pb.errors[j].reason == want.reason
            assert tuple(pb.dims[j]) == (0, 0)
            assert pb.errors[j].http_status == want.http_status
            continue
        assert j not in pb.errors
        assert tuple(pb.dims[j]) == decode_bytes(p).shape[:2]
        for s, w in zip((32, 40), want):
            got = pb.x[s][j].permute(1, 2, 0).numpy()
            np.testing.assert_array_equal(got, w)
    assert n_bad >= 3  # junk, truncated, empty


def test_ring_reuse_and_growth(procs):
    """More batches than slots, of growing sizes: every batch still gets its own pixels."""
    rng = np.random.default_rng(1)
    for n in (1, 5, 9, 2, 30, 4):
        payloads = [encode_jpeg(_smooth(rng, 32 + (i % 3) * 8, 40), 80) for i in range(n)]
        jobs = [procs.submit(payloads)]
        pb = procs.collect(jobs[0], device="cpu")
        assert not pb.errors
        for j, p in enumerate(payloads):
            np.testing.assert_array_equal(pb.x[40][j].permute(1, 2, 0).numpy(), _expected(p, (40,))[0])


def test_two_batches_in_flight(procs):
    rng = np.random.default_rng(2)
    a = [encode_jpeg(_smooth(rng, 32, 32), 80) for _ in range(7)]
    b = [encode_jpeg(_smooth(rng, 48, 40), 80) for _ in range(5)]
    ja, jb = procs.submit(a), procs.submit(b)
    pb_b, pb_a = procs.collect(jb, device="cpu"), procs.collect(ja, device="cpu")
    for batch, pb in ((a, pb_a), (b, pb_b)):
        for j, p in enumerate(batch):
            np.testing.assert_array_equal(pb.x[32][j].permute(1, 2, 0).numpy(), _expected(p, (32,))[0])
    with pytest.raises(RuntimeError, match="already collected"):
        procs.collect(ja, device="cpu")


def test_abandoned_batch_frees_its_slot(procs):
    rng = np.random.default_rng(3)
    batch = [encode_jpeg(_smooth(rng, 32, 32), 80) for _ in range(4)]
    for _ in range(len(procs._slots) + 2):  # more than the ring: would block if slots leaked
        procs.abandon(procs.submit(batch))
    assert procs.decode(batch, device="cpu").n == 4


def test_a_dead_worker_loses_nothing():
    """Kill a worker mid-run: its rows are decoded again in the parent, the pool restarts, answers stay exact."""
    rng = np.random.default_rng(4)
    payloads = [encode_jpeg(_smooth(rng, 40, 40), 80) for _ in range(12)] + [b"junk"]
    with DecodeProcs(2, (32,), pin=False, chunk=2) as p:
        for pid in {f.result() for f in [p.pool.submit(os.getpid) for _ in range(4)]}:
            os.kill(pid, 9)
        pb = p.decode(payloads, device="cpu")
        assert p.restarts >= 1 and pb.redone > 0
        assert set(pb.errors) == {12} and pb.errors[12].reason == "not_image"
        for j, x in enumerate(payloads[:12]):
            np.testing.assert_array_equal(pb.x[32][j].permute(1, 2, 0).numpy(), _expected(x, (32,))[0])
        assert p.decode(payloads[:3], device="cpu").redone == 0  # the new pool works


def test_a_batch_over_its_time_limit_is_redone_here():
    """Workers slower than timeout_s (here: any) are stopped and their rows decoded in the parent: exact
    answers, no hang, and the restarted pool serves the next batch."""
    rng = np.random.default_rng(10)
    payloads = [encode_jpeg(_smooth(rng, 40, 36), 80) for _ in range(10)] + [b"junk"]
    with DecodeProcs(2, (32,), pin=False, chunk=2, timeout_s=0.0) as p:
        first = p.pool
        pb = p.decode(payloads, device="cpu")
        assert pb.redone > 0 and p.restarts >= 1 and p.pool is not first
        assert all(not w.is_alive() for w in (first._processes or {}).values())
        assert set(pb.errors) == {10}
        for j, x in enumerate(payloads[:10]):
            np.testing.assert_array_equal(pb.x[32][j].permute(1, 2, 0).numpy(), _expected(x, (32,))[0])
        p.timeout_s = 60.0
        assert p.decode(payloads[:4], device="cpu").redone == 0


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.lists(st.binary(max_size=64), max_size=6), cut=st.integers(0, 400))
def test_decode_rows_never_raises_on_garbage(data, cut):
    """decode_rows (the worker's loop) on arbitrary bytes: a BadImage or pixels, never another error."""
    rng = np.random.default_rng(cut)
    good = encode_jpeg(_smooth(rng, 24, 24), 80)
    payloads = data + [good[:cut], good]
    seen: dict[int, list] = {}
    bad, dims = decode_rows(payloads, (16,), DecodeLimits(), lambda j, k, px: seen.setdefault(j, []).append(px.shape))
    bad_rows = {j for j, _ in bad}
    assert all((dims[j] == 0) == (j in bad_rows) for j in range(len(payloads)))
    assert dims[-1] == (24 << 32) | 24
    assert bad_rows.isdisjoint(seen) and bad_rows | set(seen) == set(range(len(payloads)))
    assert all(v == [(16, 16, 3)] for v in seen.values())
    assert len(payloads) - 1 in seen


def test_config_validation():
    with pytest.raises(ValueError, match="proc_share"):
        GpuConfig(proc_share=1.5)
    with pytest.raises(ValueError, match="procs"):
        GpuConfig(procs=-2)
    with pytest.raises(ValueError, match="workers"):
        DecodeProcs(0, (32,))


@given(st.integers(1, 512))
def test_auto_procs(cpus):
    from roadcascade.accel.runtime import auto_procs

    n = auto_procs(cpus)
    assert 0 <= n <= 12 and n <= cpus - 4 if cpus >= 8 else n == 0
    assert (n == 0) == (cpus < 8)
    assert auto_procs(cpus + 1) >= n  # more CPUs never fewer processes


def test_auto_is_off_on_the_cpu_runtime():
    gc = GpuCascade(_tiny_cascade(), device="cpu")
    try:
        assert gc.cfg.procs == 0 and gc.procs is None
    finally:
        gc.close()


@pytest.mark.parametrize("share", [0.5, 1.0])
def test_runtime_with_processes_matches_cascade_predict(share):
    """The whole runtime (both tiers, bad rows, rows split between this process and the workers)
    gives Cascade.predict's answers exactly, in one batch and streamed."""
    casc = _tiny_cascade()
    rng = np.random.default_rng(7)
    payloads, bad_rows = _payloads(rng)
    payloads = payloads + [encode_jpeg(_smooth(rng, 30 + i, 40), 75) for i in range(8)]
    cfg = GpuConfig(procs=2, proc_share=share, proc_min=4, decode_workers=2, prefetch=2, proc_adapt=False)
    gc = GpuCascade(casc, device="cpu", config=cfg)
    try:
        res = gc.predict_batch(payloads)
        streamed = list(gc.predict_stream([payloads[:9], payloads[9:]]))
        small = gc.predict_batch(payloads[:3])  # under proc_min: no processes
    finally:
        gc.close()
    assert res.n_proc_decoded > 0 and small.n_proc_decoded == 0
    good_rows = [i for i in range(len(payloads)) if i not in bad_rows]
    ref = casc.predict([decode_bytes(payloads[i]) for i in good_rows])
    assert set(res.errors) == set(bad_rows)
    for i, r in zip(good_rows, ref):
        assert res.probability[i] == pytest.approx(r.probability, abs=1e-6)
        assert res.exit[i] == r.trace.exit
    assert {r.trace.exit for r in ref} == {0, 1}
    got = np.concatenate([r.probability for r in streamed])
    np.testing.assert_allclose(got, res.probability, atol=1e-6, equal_nan=True)
    np.testing.assert_allclose(small.probability, res.probability[:3], atol=1e-6, equal_nan=True)


def _boom(limits):
    raise OSError("this worker cannot start")


def test_workers_that_cannot_start_give_a_clear_error(monkeypatch):
    """A pool whose workers die at start: DecodeProcs says why (and how to run without it); the runtime
    warns and runs without processes, with the same answers."""
    import roadcascade.accel.procdecode as pd

    monkeypatch.setattr(pd, "_worker_init", _boom)
    with pytest.raises(RuntimeError, match="did not start.*__main__.*procs=0"):
        DecodeProcs(1, (32,), pin=False)
    casc = _tiny_cascade()
    payloads, _ = _payloads(np.random.default_rng(8))
    with pytest.warns(RuntimeWarning, match="without decode processes"):
        gc = GpuCascade(casc, device="cpu", config=GpuConfig(procs=1, proc_min=1))
    try:
        assert gc.procs is None
        res = gc.predict_batch(payloads)
    finally:
        gc.close()
    assert res.n_proc_decoded == 0 and np.isfinite(res.probability).sum() == len(payloads) - 2


@given(share=st.floats(0.0, 1.0), ready=st.booleans(), waited=st.floats(0.0, 1.0), own=st.floats(0.0, 1.0))
def test_adapt_share_properties(share, ready, waited, own):
    from roadcascade.accel.runtime import adapt_share

    new = adapt_share(share, ready, waited, own)
    assert 0.05 <= new <= 0.95
    assert abs(new - min(0.95, max(0.05, share))) <= 0.02 + 1e-12  # small steps
    if ready:  # the processes were idle first: never less for them
        assert new >= min(0.95, max(0.05, share)) - 1e-12
    elif waited > 0.1 * own:  # this process waited for them: never more
        assert new <= min(0.95, max(0.05, share)) + 1e-12


def test_adaptive_share_moves_and_answers_stay_exact():
    """With adaptation on, the share moves between batches (within bounds) and the answers do not change."""
    casc = _tiny_cascade()
    rng = np.random.default_rng(9)
    payloads = [encode_jpeg(_smooth(rng, 32, 32), 75) for _ in range(24)]
    gc = GpuCascade(casc, device="cpu", config=GpuConfig(procs=2, proc_share=0.5, proc_min=4, proc_adapt=True))
    try:
        shares, probs = [], []
        for _ in range(6):
            res = gc.predict_batch(payloads)
            shares.append(gc.proc_share_now)
            probs.append(res.probability)
    finally:
        gc.close()
    assert all(0.05 <= s <= 0.95 for s in shares) and len(set(shares)) > 1
    for p in probs[1:]:
        np.testing.assert_allclose(p, probs[0], atol=1e-6)


def test_every_decoder_places_its_rows_on_the_cpu():
    """The measured routing's plumbing without CUDA: a BatchDecoder on the CPU runs a plan made as on a CUDA machine
    (GPU decoder = torchvision's CPU decode here, in calls of a small megapixel budget; reduced-size decodes on the
    CPU threads and in the decode processes; the exact path for the rest). Every row lands in its place: the first
    tier's input equals the CPU path's (reduced decode + PIL resize) within one level (the GPU rows resize the
    full-size decode), bad rows are BadImage, decoded sizes are recorded."""
    from roadcascade.accel.decoder import BatchDecoder, plan_rows

    rng = np.random.default_rng(21)
    shapes = [(240, 320), (96, 128), (240, 320), (130, 200), (96, 128), (240, 320)] * 3
    payloads = [encode_jpeg(_smooth(rng, h, w), 85) for h, w in shapes]
    png = io.BytesIO()
    Image.fromarray(_smooth(rng, 50, 60)).save(png, format="PNG")
    payloads += [png.getvalue(), b"junk", payloads[0][: len(payloads[0]) // 2]]
    cfg = GpuConfig(gpu_chunk_mpix=0.2, proc_min=4, route_min_mpix=0.0)
    dec = BatchDecoder(torch.device("cpu"), cfg, 32, 40, keep_images=False, log=lambda m: None)
    try:
        dec.start_procs(2)
        dec.router.rates.update(gpu=1.0, threads=1.0, procs=1.0)
        plan = plan_rows(payloads, cfg, True, dec.router, True, 0.7)  # as on a CUDA machine
        assert plan.gpu and plan.threads and plan.procs and len(plan.gpu) >= 3
        job = dec.procs.submit([payloads[i] for i in plan.procs])
        d = dec._run(payloads, plan, job, inline=False, keep=False, t0=0.0)
    finally:
        dec.close()
    assert sorted(d.errors) == [19, 20] and d.errors[19].reason == "not_image" and d.errors[20].reason == "truncated"
    assert list(d.good) == [i for i in range(len(payloads)) if i not in (19, 20)]
    assert d.x0.shape == (len(d.good), 3, 32, 32)
    for j, i in enumerate(d.good):
        want = resize_square(decode_bytes(payloads[i], min_size=40), 32).astype(int)
        got = d.x0[j].permute(1, 2, 0).numpy().astype(int)
        tol = 3 if i in plan.gpu else 0  # full-size decode + one resize vs DCT-scaled decode + resize
        assert np.abs(got - want).max() <= tol, (i, np.abs(got - want).max())
        assert tuple(d.dims[i]) in (shapes[i] if i < len(shapes) else (50, 60), decode_bytes(payloads[i], min_size=40).shape[:2])
    assert d.n_gpu == len(plan.gpu) and d.n_proc == len([i for i in plan.procs if i not in (19, 20)])
