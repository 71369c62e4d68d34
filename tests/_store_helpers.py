"""Builders of hostile and damaged store files (labelrefine.store) for the tests."""

from __future__ import annotations

import io
import os
import shlex
import zipfile
from pathlib import Path

import torch


class RunsCode:
    """Unpickling this runs ``touch TARGET``: the payload of issue 13's item 1."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.target))}",))


def code_payload(target: Path) -> bytes:
    """torch.save bytes of ``{'format': 'x', 'payload': RunsCode(target)}``."""
    buf = io.BytesIO()
    torch.save({"format": "x", "payload": RunsCode(target)}, buf)
    return buf.getvalue()


def payload_start(path: Path) -> int:
    """Offset of the payload (after the header line) in a store file."""
    return path.read_bytes().index(b"\n") + 1


def tensor_region(path: Path) -> tuple[int, int]:
    """(offset, length) in ``path`` of the bytes of the largest tensor record of a store file."""
    data = path.read_bytes()
    start = payload_start(path)
    payload = data[start:]
    with zipfile.ZipFile(io.BytesIO(payload)) as z:
        info = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    # the local file header: 30 fixed bytes, then the name and the extra field
    local = payload[info.header_offset: info.header_offset + 30]
    name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
    return start + info.header_offset + 30 + name_len + extra_len, info.file_size


def overwrite(path: Path, offset: int, data: bytes) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset: offset + len(data)] = data
    path.write_bytes(bytes(raw))


def random_bytes_in_tensor(path: Path, n: int = 64, seed: int = 0) -> None:
    """Write ``n`` random bytes into the middle of the largest tensor of ``path`` (issue 13, item 2)."""
    offset, length = tensor_region(path)
    assert length >= n
    junk = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    overwrite(path, offset + (length - n) // 2, bytes(junk.tolist()))
