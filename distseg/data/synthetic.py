"""Procedural aerial-like scenes for tests and the demo.

Scenes have textured farmland, roads, buildings with shadows, water, grassland (and, in the
"intermediate" domain, forest and bare soil). Colours and textures correlate with the class but
overlap between classes (grassland vs farmland, roofs vs roads, bare soil vs background) and carry
scene-level illumination shifts and sensor noise, so a small model learns them well above chance
but not trivially. The two domains differ in palette, texture, object scale and class set, which
exercises head replacement between distillation hops. :func:`interpolate` places a domain anywhere between the
two (a continuous distance knob), so candidate intermediate domains of controlled closeness can be generated.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

RGB = tuple[int, int, int]


@dataclasses.dataclass(frozen=True)
class Domain:
    """Appearance and content of one synthetic domain."""

    classes: tuple[str, ...]
    """Class names in index order."""
    colors: dict[str, RGB]
    """Mean colour of each class (also the mask colour in colour-coded masks)."""
    texture: float
    """Amplitude of fine per-pixel texture (0-255 scale)."""
    scale: float
    """Object size multiplier (fields, buildings, road widths)."""
    crop_hues: tuple[RGB, ...]
    """Alternative farmland colours (one per field)."""
    cover: dict[str, float] = dataclasses.field(default_factory=dict)
    """Area multiplier in [0, 1] of noise-grown region classes (bare_soil, grassland, forest); a class not listed
    keeps its full area. 0 never draws the class, which lets a domain keep a class in its map but not in its
    images (how :func:`interpolate` fades in the classes the target lacks)."""


DOMAINS: dict[str, Domain] = {
    "target": Domain(
        classes=("background", "road", "farmland", "building", "water", "grassland"),
        colors={"background": (176, 160, 128), "road": (120, 120, 118), "farmland": (118, 150, 70),
                "building": (150, 140, 135), "water": (40, 75, 110), "grassland": (95, 135, 75)},
        texture=14.0, scale=1.0, crop_hues=((118, 150, 70), (170, 160, 90), (130, 110, 70))),
    "intermediate": Domain(
        classes=("background", "road", "farmland", "building", "water", "grassland", "forest", "bare_soil"),
        colors={"background": (150, 150, 135), "road": (165, 150, 120), "farmland": (90, 170, 60),
                "building": (185, 90, 75), "water": (55, 100, 80), "grassland": (120, 170, 95),
                "forest": (40, 80, 40), "bare_soil": (160, 125, 90)},
        texture=24.0, scale=1.6, crop_hues=((90, 170, 60), (200, 190, 80), (110, 140, 50))),
}


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth noise in [0, 1] with features about ``cell`` pixels wide (bicubic-upsampled grid)."""
    gh, gw = max(2, math.ceil(h / cell) + 1), max(2, math.ceil(w / cell) + 1)
    grid = Image.fromarray((rng.random((gh, gw)) * 255).astype(np.uint8))
    return np.asarray(grid.resize((w, h), Image.Resampling.BICUBIC), dtype=np.float32) / 255.0


def _polygon(rng: np.random.Generator, cx: float, cy: float, a: float, b: float) -> list[tuple[float, float]]:
    """A rotated a×b rectangle centred at (cx, cy)."""
    t = rng.uniform(0, math.pi)
    c, s = math.cos(t), math.sin(t)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in ((-a, -b), (a, -b), (a, b), (-a, b))]


def _layout(rng: np.random.Generator, h: int, w: int, dom: Domain) -> tuple[np.ndarray, list, np.ndarray]:
    """Draw the label map; returns it, the farm fields (polygon, hue) and the building shadow mask."""
    idx = {name: i for i, name in enumerate(dom.classes)}
    s = dom.scale
    mask = np.zeros((h, w), dtype=np.uint8)
    for name, cell, thr in (("bare_soil", 60, 0.62), ("grassland", 45, 0.6), ("forest", 55, 0.64)):
        if name in idx:
            if name in dom.cover:  # shrink the region by raising its threshold toward 1 (never reached)
                thr = 1.0 - dom.cover[name] * (1.0 - thr)
            mask[_noise(rng, h, w, cell * s) > thr] = idx[name]
    img = Image.fromarray(mask)
    draw = ImageDraw.Draw(img)
    fields = []
    for _ in range(rng.poisson(h * w / (90 * 90 * s * s)) + 1):
        poly = _polygon(rng, rng.uniform(0, w), rng.uniform(0, h), rng.uniform(10, 30) * s, rng.uniform(8, 22) * s)
        draw.polygon(poly, fill=idx["farmland"])
        fields.append((poly, dom.crop_hues[int(rng.integers(len(dom.crop_hues)))]))
    mask = np.asarray(img).copy()
    mask[_noise(rng, h, w, 80 * s) > 0.7] = idx["water"]
    img = Image.fromarray(mask)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 3 + (h * w) // 60000))):
        t = rng.uniform(0, math.pi)
        cx, cy, r = rng.uniform(0, w), rng.uniform(0, h), (h + w)
        draw.line([(cx - r * math.cos(t), cy - r * math.sin(t)), (cx + r * math.cos(t), cy + r * math.sin(t))],
                  fill=idx["road"], width=max(2, int(rng.uniform(3, 7) * s)))
    shadow = Image.new("L", (w, h), 0)
    shade = ImageDraw.Draw(shadow)
    for _ in range(rng.poisson(h * w / (35 * 35 * s * s))):
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        bw, bh = rng.uniform(4, 11) * s, rng.uniform(4, 11) * s
        off = 2 * s
        shade.rectangle([x + off, y + off, x + bw + off, y + bh + off], fill=1)
        draw.rectangle([x, y, x + bw, y + bh], fill=idx["building"])
    mask = np.asarray(img).copy()
    return mask, fields, np.asarray(shadow).astype(bool) & (mask != idx["building"])


def _render(rng: np.random.Generator, mask: np.ndarray, fields: list, shadow: np.ndarray, dom: Domain) -> np.ndarray:
    """Colour the label map: class colours + per-scene shift + smooth variation + texture + noise."""
    h, w = mask.shape
    idx = {name: i for i, name in enumerate(dom.classes)}
    palette = np.array([dom.colors[c] for c in dom.classes], dtype=np.float32)
    palette += rng.normal(0, 10, size=palette.shape)  # per-scene colour shift: classes overlap across scenes
    image = palette[mask]
    field_colors = Image.new("RGB", (w, h), (0, 0, 0))
    fd = ImageDraw.Draw(field_colors)
    for poly, hue in fields:
        fd.polygon(poly, fill=tuple(int(v + rng.normal(0, 8)) for v in hue))
    farm = mask == idx["farmland"]
    fc = np.asarray(field_colors, dtype=np.float32)
    image[farm] = np.where(fc[farm].sum(1, keepdims=True) > 0, fc[farm], image[farm])
    period, theta = rng.uniform(3, 6) * dom.scale, rng.uniform(0, math.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    stripes = np.sin((xx * math.cos(theta) + yy * math.sin(theta)) * 2 * math.pi / period)
    image[farm] += 12 * stripes[farm, None]
    image += (_noise(rng, h, w, 40)[..., None] - 0.5) * 40  # smooth illumination / moisture variation
    rough = np.ones(len(dom.classes), dtype=np.float32)
    rough[idx["water"]], rough[idx["road"]] = 0.3, 0.5
    if "forest" in idx:
        rough[idx["forest"]] = 2.0
    image += rng.normal(0, 1, size=(h, w, 1)).astype(np.float32) * dom.texture * rough[mask][..., None]
    image[shadow] *= 0.55
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0, 5, size=image.shape)  # exposure + sensor noise
    out = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(0.6))
    return np.asarray(out)


def _lerp(a: float, b: float, t: float) -> float:
    return (1.0 - t) * a + t * b


def _lerp_rgb(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(round(_lerp(x, y, t))) for x, y in zip(a, b))


def interpolate(t: float, source: str = "target", dest: str = "intermediate") -> Domain:
    """The domain a fraction ``t`` of the way from ``source`` to ``dest``: the distance knob of the benchmarks.

    Palette (class and crop colours), texture amplitude and object scale are interpolated linearly. The class set
    is ``dest``'s; classes that ``source`` lacks keep ``dest``'s mask colour (so the class map stays unambiguous)
    and fade in through :attr:`Domain.cover`, so ``t = 0`` draws images distributed exactly as ``source``'s (its
    map merely lists the absent classes) and ``t = 1`` is ``dest`` itself.
    """
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"interpolation distance must be in [0, 1], got {t}")
    a, b = resolve(source), resolve(dest)
    if len(a.crop_hues) != len(b.crop_hues):
        raise ValueError(f"{source} and {dest} have different numbers of crop hues")
    colors = {c: _lerp_rgb(a.colors[c], b.colors[c], t) if c in a.colors else b.colors[c] for c in b.classes}
    return Domain(classes=b.classes, colors=colors, texture=_lerp(a.texture, b.texture, t),
                  scale=_lerp(a.scale, b.scale, t),
                  crop_hues=tuple(_lerp_rgb(x, y, t) for x, y in zip(a.crop_hues, b.crop_hues)),
                  cover={c: t for c in b.classes if c not in a.colors})


def resolve(domain: str | Domain) -> Domain:
    """A domain by name (``DOMAINS``), or the given :class:`Domain` itself."""
    if isinstance(domain, Domain):
        return domain
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}; choose from {sorted(DOMAINS)}")
    return DOMAINS[domain]


def make_scene(rng: np.random.Generator, size: int | tuple[int, int],
               domain: str | Domain = "target") -> tuple[np.ndarray, np.ndarray]:
    """One scene: (uint8 H×W×3 image, uint8 H×W mask of indices into the domain's ``classes``).

    ``size`` is a side length or (height, width); ``domain`` a name in ``DOMAINS`` or a :class:`Domain` (e.g.
    from :func:`interpolate`). Object sizes are in pixels (a fixed ground resolution), so larger scenes hold more
    objects rather than bigger ones.
    """
    dom = resolve(domain)
    h, w = (size, size) if isinstance(size, int) else size
    mask, fields, shadow = _layout(rng, h, w, dom)
    return _render(rng, mask, fields, shadow, dom), mask


def class_map_dict(domain: str | Domain, mask_format: Literal["index", "color"] = "index") -> dict:
    """The class-map file content for a domain, for index masks (``value``) or colour masks (``color``)."""
    dom = resolve(domain)
    key = "value" if mask_format == "index" else "color"
    return {"ignore_index": 255, "classes": [
        {"name": c, "index": i, key: (i if key == "value" else list(dom.colors[c]))}
        for i, c in enumerate(dom.classes)]}


def write_dataset(out_dir: str | Path, n_images: int, size: int | tuple[int, int] = (96, 256),
                  domain: str | Domain = "target", seed: int = 0, n_unlabeled: int = 0,
                  mask_format: Literal["index", "color"] = "index", image_format: Literal["png", "jpg"] = "png",
                  ) -> Path:
    """Write ``images/``, ``masks/``, ``unlabeled/`` and ``classes.yaml`` under ``out_dir``.

    ``size`` is a side length, or a (low, high) range from which each image's height and width are
    drawn. Use a large side (e.g. 1024) to make rasters that need ``shard-data --tile``. ``domain`` is a name or
    a :class:`Domain` (e.g. ``interpolate(0.4)``).
    """
    import yaml

    out = Path(out_dir)
    rng = np.random.default_rng(seed)
    dom = resolve(domain)
    colors = np.array([dom.colors[c] for c in dom.classes], dtype=np.uint8)
    for sub, count, prefix in (("images", n_images, "scene"), ("unlabeled", n_unlabeled, "extra")):
        if count:
            (out / sub).mkdir(parents=True, exist_ok=True)
        if sub == "images" and count:
            (out / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(count):
            shape = (size, size) if isinstance(size, int) else tuple(int(v) for v in rng.integers(*size, endpoint=True,
                                                                                                   size=2))
            image, mask = make_scene(rng, shape, dom)
            name = f"{prefix}_{i:04d}"
            Image.fromarray(image).save(out / sub / f"{name}.{image_format}", quality=92)
            if sub == "images":
                Image.fromarray(mask if mask_format == "index" else colors[mask]).save(out / "masks" / f"{name}.png")
    (out / "classes.yaml").write_text(yaml.safe_dump(class_map_dict(domain, mask_format), sort_keys=False))
    return out
