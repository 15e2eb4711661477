"""The minimal tar reader agrees with tarfile and fails loudly on damaged archives."""
from __future__ import annotations

import io
import tarfile

import pytest

from distseg.data.tario import TarFormatError, TarStream

LONG = "d/" + "x" * 120 + ".png"  # needs a GNU long-name or PAX path record


def make_tar(fmt: int, names: list[str]) -> tuple[bytes, dict[str, bytes]]:
    """A tar with a directory entry first, then one file per name with distinct contents."""
    buf, contents = io.BytesIO(), {}
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        info = tarfile.TarInfo("somedir")
        info.type = tarfile.DIRTYPE
        tar.addfile(info)
        for i, name in enumerate(names):
            contents[name] = bytes(range(256)) * (i * 3 + 1) + b"tail"
            info = tarfile.TarInfo(name)
            info.size = len(contents[name])
            tar.addfile(info, io.BytesIO(contents[name]))
    return buf.getvalue(), contents


@pytest.mark.parametrize("fmt, names", [
    (tarfile.USTAR_FORMAT, ["a.jpg", "a.json", "b.mask.png"]),
    (tarfile.GNU_FORMAT, ["a.jpg", "a.json", LONG, "b.mask.png"]),
    (tarfile.PAX_FORMAT, ["a.jpg", "a.json", LONG, "b.mask.png"]),
])
def test_reads_what_tarfile_wrote_and_skips_unread_members(fmt, names):
    raw, contents = make_tar(fmt, names)
    stream = TarStream(io.BytesIO(raw), "t.tar")
    seen = {name: stream.read() for name in stream if name != "a.json"}  # a.json is skipped unread
    assert seen == {n: c for n, c in contents.items() if n != "a.json"}


def test_truncated_and_corrupt_archives_raise():
    raw, _ = make_tar(tarfile.GNU_FORMAT, ["a.jpg", "b.png"])
    stream = TarStream(io.BytesIO(raw[:1100]), "t.tar")
    with pytest.raises(TarFormatError, match="t.tar: truncated"):
        for _ in stream:
            stream.read()
    damaged = bytearray(raw)
    damaged[5] ^= 0xFF
    with pytest.raises(TarFormatError, match="checksum"):
        list(TarStream(io.BytesIO(bytes(damaged)), "t.tar"))
