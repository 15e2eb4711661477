"""Reading images and masks from folders, with errors that name the file and the problem."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from distseg.data.errors import DataError
from distseg.limits import MAX_PIXELS, check_pixels, pil_cap_off

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff")
PASS_THROUGH = {"JPEG": "jpg", "PNG": "png"}
"""Encoded formats stored in shards byte-for-byte (other formats are re-encoded as PNG)."""



def list_images(folder: Path, what: str) -> dict[str, Path]:
    """Image files of ``folder`` by stem; a missing or empty folder, or two files with one stem, is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: {what} folder not found")
    files: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            continue
        if path.stem in files:
            raise DataError(f"{path}: two {what} files share the stem {path.stem!r} ({files[path.stem].name})")
        files[path.stem] = path
    if not files:
        raise DataError(f"{folder}: empty {what} folder (no {'/'.join(s[1:] for s in IMAGE_SUFFIXES)} files)")
    return files


def _checked(path: Path, im: Image.Image, max_pixels: int) -> Image.Image:
    problem = check_pixels(*im.size, max_pixels)
    if problem:
        raise DataError(f"{path}: {problem}")
    return im


def image_size(path: Path, max_pixels: int = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the file header only, without decoding pixels; an image over ``max_pixels`` is an
    error, so a decompression bomb is refused before anything is decoded or written."""
    try:
        with pil_cap_off(), Image.open(path) as im:
            return _checked(path, im, max_pixels).size
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: unreadable image ({exc.__class__.__name__}: {exc})") from None


def _open_decoded(path: Path, data: bytes, max_pixels: int) -> Image.Image:
    """Fully decode ``data`` (refusing more than ``max_pixels``); truncated or corrupt files raise DataError."""
    try:
        with pil_cap_off():
            im = Image.open(io.BytesIO(data))
        _checked(path, im, max_pixels).load()
        return im
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{path}: unreadable or truncated image ({exc})") from None


def load_image(path: Path, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, bytes, str | None]:
    """Decode an image to uint8 H×W×3.

    Returns the pixels, the file's bytes and the shard extension under which those bytes can be
    stored unchanged (None when the file must be re-encoded: tif, or a mode other than RGB).
    """
    data = Path(path).read_bytes()
    im = _open_decoded(path, data, max_pixels)
    ext = PASS_THROUGH.get(im.format or "") if im.mode == "RGB" else None
    if im.mode not in ("RGB", "RGBA", "L", "P", "LA", "CMYK", "YCbCr"):
        raise DataError(f"{path}: unsupported image mode {im.mode} (expected 8-bit RGB, grey or palette)")
    rgb = np.asarray(im.convert("RGB") if im.mode != "RGB" else im)
    return rgb, data, ext


def load_mask(path: Path, rgb: bool, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode a mask: H×W×3 colours when ``rgb`` (palette PNGs are expanded), else H×W values."""
    im = _open_decoded(path, Path(path).read_bytes(), max_pixels)
    if im.mode in ("RGB", "RGBA") or (rgb and im.mode in ("P", "PA")):
        return np.asarray(im.convert("RGB"))
    if im.mode in ("L", "P", "I", "I;16", "I;16B", "1"):
        return np.asarray(im if im.mode != "1" else im.convert("L")).astype(np.int64, copy=False)
    raise DataError(f"{path}: unsupported mask mode {im.mode}")


def encode_png(array: np.ndarray, level: int = 1) -> bytes:
    """Losslessly encode a uint8 H×W or H×W×3 array as PNG (``level``: zlib effort, 0-9)."""
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=level)
    return buf.getvalue()


def open_image(data: bytes) -> Image.Image:
    """Encoded image bytes -> decoded RGB PIL image (the stream keeps PIL images until the crop)."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return im if im.mode == "RGB" else im.convert("RGB")


def open_mask(data: bytes) -> Image.Image:
    """PNG index-mask bytes -> decoded PIL image (mode L)."""
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def decode_image(data: bytes) -> np.ndarray:
    """Encoded image bytes -> uint8 H×W×3."""
    return np.asarray(open_image(data))


def decode_mask(data: bytes) -> np.ndarray:
    """PNG index-mask bytes -> uint8 H×W."""
    return np.asarray(open_mask(data))


def write_grid_png(images, path: Path) -> None:
    """Write images (a N×3×H×W torch tensor in [0, 1]) as one PNG grid, about square, with a 2-pixel white gutter,
    through a temporary file so a reader never sees half a picture."""
    from torchvision.utils import make_grid

    columns = max(1, round(len(images) ** 0.5))
    grid = make_grid(images, nrow=columns, padding=2, pad_value=1.0)
    array = (grid.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    tmp = path.with_name(path.name + ".tmp.png")
    Image.fromarray(array).save(tmp)
    tmp.replace(path)
