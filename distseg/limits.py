"""Input limits shared by ``distseg shard-data`` and ``distseg predict`` (standard library only)."""
from __future__ import annotations

import contextlib
from typing import Iterator

MAX_PIXELS = 178_956_970
"""Default cap on the pixels of an image decoded whole in memory: PIL's own decompression-bomb limit
(2 × ``PIL.Image.MAX_IMAGE_PIXELS``, about 13,400² pixels). A file whose header claims more is refused before it is
decoded (``--max-pixels`` raises the cap); GeoTIFFs in ``predict`` are read window by window and need no cap."""


def check_pixels(width: int, height: int, max_pixels: int) -> str | None:
    """Why a ``width × height`` image may not be decoded whole, or None when it is within ``max_pixels``."""
    if width * height <= max_pixels:
        return None
    return (f"{width}x{height} = {width * height:,} pixels is over the {max_pixels:,}-pixel cap (a decompression "
            f"bomb, or a real raster: then pass a larger --max-pixels)")


@contextlib.contextmanager
def pil_cap_off() -> Iterator[None]:
    """Open image headers with PIL's global bomb check off, for a caller that applies :func:`check_pixels` with
    its own ``max_pixels`` instead (PIL's limit is process-wide and cannot be raised per call). Single-threaded."""
    from PIL import Image

    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved
