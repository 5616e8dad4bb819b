"""Output of ``roadcascade predict`` (and names in ``eval`` messages): one line per image, safe to print.

File names come from the user's disk and may hold tabs, newlines or ANSI escape sequences; printed raw they
split a line into two records or rewrite the terminal. :func:`printable` escapes them; the ``--json`` lines
escape them by JSON's own rules.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def printable(text: str) -> str:
    """``text`` with control characters (tabs, newlines, ANSI escapes, C1 codes), backslashes and undecodable
    bytes escaped, so that one value stays one field on one line of a terminal."""
    out = []
    for ch in text:
        o = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif o < 0x20 or 0x7F <= o < 0xA0 or o in (0x2028, 0x2029):
            out.append(f"\\x{o:02x}" if o < 0x100 else f"\\u{o:04x}")
        elif 0xDC80 <= o <= 0xDCFF:  # a byte os.fsdecode could not decode (surrogateescape)
            out.append(f"\\x{o - 0xDC00:02x}")
        else:
            out.append(ch)
    return "".join(out)


def predict_lines(cascade: Any, paths: list[Path], trace: bool, as_json: bool) -> Iterator[tuple[str, bool]]:
    """(line, ok) for one batch of paths, in input order."""
    from ..io.images import BadImage, decode_path

    size = getattr(cascade, "decode_size", None)
    min_size = size() if callable(size) else None  # reduced-size JPEG decode: what the tiers need, no more
    decoded: dict[int, object] = {}
    for k, p in enumerate(paths):
        try:
            decoded[k] = decode_path(p, min_size=min_size)
        except BadImage as e:
            decoded[k] = e
    good = [k for k, v in decoded.items() if not isinstance(v, BadImage)]
    preds = dict(zip(good, cascade.predict([decoded[k] for k in good]) if good else []))
    for k, p in enumerate(paths):
        name = os.fsdecode(p)
        if k in preds:
            pr = preds[k]
            if as_json:
                d = {"file": name, "probability": pr.probability, "label": "roadwork" if pr.label else "none"}
                yield json.dumps({**d, "trace": pr.trace.as_dict()} if trace else d), True
            else:
                line = f"{printable(name)}\t{pr.probability:.4f}\t{'roadwork' if pr.label else 'none'}"
                yield (line + "\t" + json.dumps(pr.trace.as_dict()) if trace else line), True
        else:
            e = decoded[k]
            if as_json:
                yield json.dumps({"file": name, "error": {"reason": e.reason, "message": e.message}}), False
            else:
                yield f"{printable(name)}\terror\t{e.reason}: {printable(e.message)}", False
