"""The bundle loader refuses malformed bundles with one BundleError (a generated corpus of 60+), opens nothing
outside the bundle directory, and checks the SHA-256 of weights recorded at save time."""

from __future__ import annotations

import copy
import json
import os
import shutil
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from roadcascade.cascade.bundle import Bundle, BundleError
from roadcascade.serve.testing import tiny_bundle


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return tiny_bundle(tmp_path_factory.mktemp("good") / "b")


def doc_of(d: Path) -> dict:
    return json.loads((d / "bundle.json").read_text())


def write_doc(d: Path, doc: dict) -> None:
    (d / "bundle.json").write_text(json.dumps(doc))


def setter(path: str, value) -> Callable[[dict], None]:
    """Set doc[path] (dotted, with [i]) to value; the sentinel DELETE removes the key."""
    def apply(doc: dict) -> None:
        keys = [int(k) if k.isdigit() else k for k in path.replace("[", ".").replace("]", "").split(".")]
        node = doc
        for k in keys[:-1]:
            node = node[k]
        if value is DELETE:
            del node[keys[-1]]
        else:
            node[keys[-1]] = copy.deepcopy(value)
    return apply


DELETE = object()
NAN = float("nan")

DOC_CASES: dict[str, Callable[[dict], None]] = {
    "format_missing": setter("format", DELETE),
    "format_wrong": setter("format", "roadcascade.bundle/999"),
    "tiers_missing": setter("tiers", DELETE),
    "tiers_empty": setter("tiers", []),
    "tiers_not_list": setter("tiers", {"a": 1}),
    "tiers_too_many": lambda d: d.update(tiers=[d["tiers"][0]] * 17, exits=[d["exits"][0]] * 17),
    "exits_missing": setter("exits", DELETE),
    "exits_count": lambda d: d.update(exits=d["exits"][:1]),
    "tier_not_object": setter("tiers[0]", "tier"),
    "tier_kind_unknown": setter("tiers[0].kind", "rm -rf"),
    "tier_kind_missing": setter("tiers[0].kind", DELETE),
    "tier_name_missing": setter("tiers[0].name", DELETE),
    "tier_name_empty": setter("tiers[0].name", ""),
    "tier_name_control": setter("tiers[0].name", "a\x1b[31m"),
    "tier_names_duplicate": setter("tiers[1].name", "tiny0"),
    "model_missing": setter("tiers[0].model", DELETE),
    "model_unknown": setter("tiers[0].model", "no_such_model"),
    "model_not_str": setter("tiers[0].model", 7),
    "input_size_zero": setter("tiers[0].input_size", 0),
    "input_size_negative": setter("tiers[0].input_size", -64),
    "input_size_huge": setter("tiers[0].input_size", 1_000_000),
    "input_size_float": setter("tiers[0].input_size", 64.5),
    "input_size_str": setter("tiers[0].input_size", "64"),
    "input_size_bool": setter("tiers[0].input_size", True),
    "mean_short": setter("tiers[0].mean", [0.5, 0.5]),
    "mean_str": setter("tiers[0].mean", ["a", "b", "c"]),
    "mean_huge": setter("tiers[0].mean", [1e9, 0, 0]),
    "std_zero": setter("tiers[0].std", [0.5, 0.0, 0.5]),
    "std_negative": setter("tiers[0].std", [0.5, -0.5, 0.5]),
    "std_missing": setter("tiers[0].std", DELETE),
    "calibration_missing": setter("tiers[0].calibration", DELETE),
    "calibration_not_object": setter("tiers[0].calibration", 1.0),
    "calibration_kind": setter("tiers[0].calibration.kind", "isotonic"),
    "temperature_zero": setter("tiers[0].calibration.temperature", 0.0),
    "temperature_negative": setter("tiers[0].calibration.temperature", -1.0),
    "temperature_missing": setter("tiers[0].calibration.temperature", DELETE),
    "temperature_str": setter("tiers[0].calibration.temperature", "1"),
    "cal_threshold_zero": setter("tiers[0].calibration.threshold", 0.0),
    "cal_threshold_one": setter("tiers[0].calibration.threshold", 1.0),
    "cal_threshold_big": setter("tiers[0].calibration.threshold", 7),
    "gflops_negative": setter("tiers[0].gflops", -1),
    "gflops_huge": setter("tiers[0].gflops", 1e12),
    "weights_missing_key": setter("tiers[0].weights", DELETE),
    "weights_not_str": setter("tiers[0].weights", ["a"]),
    "weights_empty": setter("tiers[0].weights", ""),
    "weights_dotdot": setter("tiers[0].weights", "../b/tiny0.safetensors"),
    "weights_dotdot_deep": setter("tiers[0].weights", "sub/../../outside.safetensors"),
    "weights_absolute": setter("tiers[0].weights", "/etc/passwd"),
    "weights_nul": setter("tiers[0].weights", "tiny0.safetensors\x00.txt"),
    "weights_absent_file": setter("tiers[0].weights", "nope.safetensors"),
    "weights_is_dir": setter("tiers[0].weights", "."),
    "weights_other_model": setter("tiers[0].model", "test_tiny_wide") ,
    "exit_not_object": setter("exits[0]", 3),
    "exit_threshold_missing": setter("exits[0].threshold", DELETE),
    "exit_threshold_zero": setter("exits[0].threshold", 0),
    "exit_threshold_one": setter("exits[0].threshold", 1),
    "exit_rule_unknown": setter("exits[0].rule.kind", "nope"),
    "exit_rule_missing": setter("exits[0].rule", DELETE),
    "exit_fusion_unknown": setter("exits[0].fusion.kind", "nope"),
    "exit_tau_out_of_range": setter("exits[0].rule.tau", 3.0),
    "hashes_not_map": setter("weights_sha256", ["x"]),
    "hashes_bad_hex": setter("weights_sha256.tiny0\\.safetensors", "zz"),
    "hash_mismatch": setter("weights_sha256.tiny0\\.safetensors", "0" * 64),
    "hash_missing_for_file": lambda d: d["weights_sha256"].pop("tiny1.safetensors"),
}


def _hashes_setter(key: str, value) -> Callable[[dict], None]:
    return lambda d: d["weights_sha256"].__setitem__(key, value)


DOC_CASES["hashes_bad_hex"] = _hashes_setter("tiny0.safetensors", "zz")
DOC_CASES["hash_mismatch"] = _hashes_setter("tiny0.safetensors", "0" * 64)


def raw_json(text: bytes) -> Callable[[Path], None]:
    return lambda d: (d / "bundle.json").write_bytes(text)


def fifo_weights(d: Path) -> None:
    os.remove(d / "tiny0.safetensors")
    os.mkfifo(d / "tiny0.safetensors")


def symlink_out(d: Path) -> None:
    outside = d.parent / "outside.safetensors"
    shutil.copy(d / "tiny0.safetensors", outside)
    os.remove(d / "tiny0.safetensors")
    os.symlink(outside, d / "tiny0.safetensors")


def json_symlink_out(d: Path) -> None:
    outside = d.parent / "outside.json"
    shutil.copy(d / "bundle.json", outside)
    os.remove(d / "bundle.json")
    os.symlink(outside, d / "bundle.json")


def corrupt_weights(d: Path) -> None:
    doc = doc_of(d)
    doc.pop("weights_sha256")  # an old bundle without hashes: the safetensors loader itself must fail cleanly
    write_doc(d, doc)
    data = (d / "tiny0.safetensors").read_bytes()
    (d / "tiny0.safetensors").write_bytes(data[: len(data) // 2])


def garbage_weights(d: Path) -> None:
    doc = doc_of(d)
    doc.pop("weights_sha256")
    write_doc(d, doc)
    (d / "tiny0.safetensors").write_bytes(b"\xff" * 64)


def swapped_weights(d: Path) -> None:
    """Weights of the other tier under this name: the hash catches it."""
    shutil.copy(d / "tiny1.safetensors", d / "tiny0.safetensors")


FILE_CASES: dict[str, Callable[[Path], None]] = {
    "json_empty": raw_json(b""),
    "json_garbage": raw_json(b"\x00\xff garbage"),
    "json_not_utf8": raw_json(b'{"format": "\xff"}'),
    "json_array": raw_json(b"[1, 2, 3]"),
    "json_nan": lambda d: (d / "bundle.json").write_text(json.dumps(doc_of(d)).replace('"temperature": 0.01', '"temperature": NaN')),
    "json_infinity": lambda d: (d / "bundle.json").write_text(json.dumps(doc_of(d)).replace('"temperature": 0.01', '"temperature": 1e400')),
    "json_deep": raw_json(b"[" * 100_000 + b"]" * 100_000),
    "json_huge": raw_json(b" " * (9 * 2**20) + b"{}"),
    "json_is_fifo": lambda d: (os.remove(d / "bundle.json"), os.mkfifo(d / "bundle.json")),
    "json_is_dir": lambda d: (os.remove(d / "bundle.json"), os.mkdir(d / "bundle.json")),
    "json_symlink_out": json_symlink_out,
    "weights_fifo": fifo_weights,
    "weights_symlink_out": symlink_out,
    "weights_truncated": corrupt_weights,
    "weights_garbage": garbage_weights,
    "weights_swapped": swapped_weights,
    "weights_deleted": lambda d: os.remove(d / "tiny1.safetensors"),
}


def make_case(good: Path, tmp_path: Path, name: str) -> Path:
    d = tmp_path / "b"
    shutil.copytree(good, d)
    if name in DOC_CASES:
        doc = doc_of(d)
        DOC_CASES[name](doc)
        write_doc(d, doc)
    else:
        FILE_CASES[name](d)
    return d


def test_the_corpus_is_large():
    assert len(DOC_CASES) + len(FILE_CASES) >= 60


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", sorted(DOC_CASES) + sorted(FILE_CASES))
def test_malformed_bundle_is_refused_with_bundle_error_only(good, tmp_path, name):
    d = make_case(good, tmp_path, name)
    result: dict = {}

    def load() -> None:  # in a thread: a loader that blocks (a FIFO) fails the test instead of hanging it
        try:
            Bundle.load(d, device="cpu")
            result["ok"] = True
        except BaseException as e:  # noqa: BLE001 - the test checks which exception it was
            result["exc"] = e

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), f"{name}: the loader blocked"
    exc = result.get("exc")
    assert type(exc) is BundleError, f"{name}: {exc!r}"
    assert str(exc)


@pytest.mark.parametrize("name,field", [("temperature_zero", "tiers[0].calibration.temperature"), ("std_zero", "tiers[0].std"),
                                        ("exit_threshold_one", "exits[0].threshold"), ("weights_dotdot", "tiers[0].weights"),
                                        ("input_size_huge", "tiers[0].input_size"), ("hash_mismatch", "tiers[0].weights")])
def test_the_error_names_the_field(good, tmp_path, name, field):
    with pytest.raises(BundleError, match=field.replace("[", r"\[").replace("]", r"\]")):
        Bundle.load(make_case(good, tmp_path, name), device="cpu")


def test_nothing_outside_the_bundle_directory_is_opened(good, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(good / "tiny0.safetensors", outside / "w.safetensors")
    cases = {"link": lambda d: (os.remove(d / "tiny0.safetensors"), os.symlink(outside / "w.safetensors", d / "tiny0.safetensors")),
             "dotdot": lambda d: write_doc(d, {**doc_of(d), "tiers": [{**doc_of(d)["tiers"][0], "weights": "../outside/w.safetensors"},
                                                                     doc_of(d)["tiers"][1]]}),
             "absolute": lambda d: write_doc(d, {**doc_of(d), "tiers": [{**doc_of(d)["tiers"][0], "weights": str(outside / "w.safetensors")},
                                                                       doc_of(d)["tiers"][1]]})}
    opened: list[str] = []

    def hook(event: str, args: tuple) -> None:
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            opened.append(os.fsdecode(args[0]))

    sys.addaudithook(hook)  # cannot be removed: it only appends to a list
    for name, mutate in cases.items():
        d = tmp_path / name
        shutil.copytree(good, d)
        mutate(d)
        opened.clear()
        with pytest.raises(BundleError):
            Bundle.load(d, device="cpu")
        assert not [p for p in opened if str(outside) in os.path.realpath(p)], name
    d = tmp_path / "fine"
    shutil.copytree(good, d)
    opened.clear()
    Bundle.load(d, device="cpu")
    data_files = [p for p in opened if not p.endswith((".py", ".pyc", ".so")) and "site-packages" not in p and "/proc/" not in p]
    assert data_files and all(os.path.realpath(p).startswith(str(d.resolve())) for p in data_files), data_files


def test_hashes_are_recorded_at_save_and_bundles_without_them_still_load(good, tmp_path):
    d = tmp_path / "old"
    shutil.copytree(good, d)
    doc = doc_of(d)
    assert set(doc["weights_sha256"]) == {"tiny0.safetensors", "tiny1.safetensors"}
    doc.pop("weights_sha256")
    write_doc(d, doc)
    b = Bundle.load(d, device="cpu")  # an old bundle: no hashes, loads
    b.save(tmp_path / "new")
    assert set(doc_of(tmp_path / "new")["weights_sha256"]) == {"tiny0.safetensors", "tiny1.safetensors"}
    Bundle.load(tmp_path / "new", device="cpu")
