"""Joint image+mask augmentation.

* weak (per sample, on uint8 numpy arrays in the loader workers): random scale-crop, flips, 90° turns;
  brightness is applied per sample while the batch is converted to float (:func:`to_float`).
* strong (per batch, on float tensors on any device): colour jitter, Gaussian blur, grayscale, so the
  SSL stage can also apply it on the GPU; CutMix boxes as an optional extra.

Geometry is applied once; the strong view is a photometric change of the *same* crop, so the
teacher's prediction on the weak view lines up pixel-for-pixel with the student's strong view.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


@dataclasses.dataclass
class AugmentConfig:
    """Weak (geometric + brightness) and strong (photometric) augmentation settings."""

    crop_size: int = 512
    """Side of the square training crop in pixels (smaller images are padded: 0 image, ignore mask)."""
    scale_range: tuple[float, float] = (0.5, 2.0)
    """Random rescale factor range applied before cropping; (1, 1) disables rescaling."""
    hflip: bool = True
    """Random horizontal flips."""
    vflip: bool = True
    """Random vertical flips (top-down imagery has no preferred 'up')."""
    rot90: bool = False
    """Random 90° turns of the crop (top-down imagery only)."""
    brightness: float = 0.2
    """Weak brightness jitter: multiply by a factor in [1 - b, 1 + b]; 0 disables."""
    jitter_prob: float = 0.8
    """Strong view: probability of colour jitter per sample."""
    jitter_brightness: float = 0.4
    """Strong view: brightness factor range [1 - x, 1 + x]."""
    jitter_contrast: float = 0.4
    """Strong view: contrast factor range [1 - x, 1 + x]."""
    jitter_saturation: float = 0.4
    """Strong view: saturation factor range [1 - x, 1 + x]."""
    blur_prob: float = 0.5
    """Strong view: probability of a Gaussian blur per sample."""
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    """Strong view: blur sigma range in pixels."""
    grayscale_prob: float = 0.2
    """Strong view: probability of converting a sample to grayscale."""
    cutmix_prob: float = 0.0
    """Strong view: probability per sample of pasting a box from another sample of the batch (0: off)."""

    def __post_init__(self) -> None:
        if self.crop_size <= 0:
            raise ValueError(f"crop_size must be positive, got {self.crop_size}")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        for name in ("jitter_prob", "blur_prob", "grayscale_prob", "cutmix_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "jitter_brightness", "jitter_contrast", "jitter_saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.blur_sigma[0] <= self.blur_sigma[1]:
            raise ValueError(f"blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}")


Picture = np.ndarray | Image.Image
"""Weak augmentation accepts numpy arrays or decoded PIL images (the stream passes PIL images and
so never copies a full-size source into numpy: only the crop is materialised)."""


def _window(picture: Picture, box: tuple[float, float, float, float], offset: tuple[int, int],
            size: tuple[int, int], crop: int, resample: Image.Resampling, fill: int) -> Image.Image:
    """Resample the source ``box`` to ``size`` and place it at ``offset`` on a crop×crop canvas."""
    pil = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
    region = pil.resize(size, resample, box=box)
    if size == (crop, crop):  # the usual case: the window lies inside the image
        return region
    canvas = Image.new(region.mode, (crop, crop), fill)
    canvas.paste(region, offset)
    return canvas


def _crop_window(image: Picture, mask: Picture | None, crop: int, scale: float, rng: np.random.Generator,
                 ignore_index: int) -> tuple[Image.Image, Image.Image | None]:
    """PIL version of :func:`scale_crop` (geometry stays in PIL until the final array)."""
    w, h = image.size if isinstance(image, Image.Image) else image.shape[1::-1]
    side = crop / scale  # window side in source pixels
    x0 = rng.uniform(min(0.0, w - side), max(0.0, w - side))
    y0 = rng.uniform(min(0.0, h - side), max(0.0, h - side))
    box = (max(x0, 0.0), max(y0, 0.0), min(x0 + side, w), min(y0 + side, h))
    ox, oy = int(round((box[0] - x0) * scale)), int(round((box[1] - y0) * scale))
    size = (max(1, min(crop - ox, int(round((box[2] - box[0]) * scale)))),
            max(1, min(crop - oy, int(round((box[3] - box[1]) * scale)))))
    out_img = _window(image, box, (ox, oy), size, crop, Image.Resampling.BILINEAR, 0)
    out_mask = None
    if mask is not None:
        out_mask = _window(mask, box, (ox, oy), size, crop, Image.Resampling.NEAREST, ignore_index)
    return out_img, out_mask


def scale_crop(image: Picture, mask: Picture | None, crop: int, scale: float,
               rng: np.random.Generator, ignore_index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """A ``crop``×``crop`` window of the image rescaled by ``scale``, padded where it leaves the image.

    Only the visible source region is resampled (never the whole image), so the cost scales with
    the crop, not with the source size. Padding is 0 in the image and ``ignore_index`` in the mask.
    """
    out_img, out_mask = _crop_window(image, mask, crop, scale, rng, ignore_index)
    return np.asarray(out_img), (np.asarray(out_mask) if out_mask is not None else None)


def weak_geometric(image: Picture, mask: Picture | None, cfg: AugmentConfig, rng: np.random.Generator,
                   ignore_index: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Random scale-crop, flips and 90° turns applied identically to image and mask.

    Flips and turns run as PIL transposes on the small crop: numpy's reversed-stride copies of
    channel-last arrays cost about as much as the resampling itself.
    """
    lo, hi = cfg.scale_range
    scale = math.exp(rng.uniform(math.log(lo), math.log(hi)))  # log-uniform: zoom in and out equally often
    image, mask = _crop_window(image, mask, cfg.crop_size, scale, rng, ignore_index)
    ops = []
    if cfg.hflip and rng.random() < 0.5:
        ops.append(Image.Transpose.FLIP_LEFT_RIGHT)
    if cfg.vflip and rng.random() < 0.5:
        ops.append(Image.Transpose.FLIP_TOP_BOTTOM)
    if cfg.rot90:
        turn = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
        ops.append(turn[int(rng.integers(4))])
    for op in ops:
        if op is not None:
            image = image.transpose(op)
            mask = mask.transpose(op) if mask is not None else None
    return np.asarray(image), (np.asarray(mask) if mask is not None else None)


def _uniform(n: int, lo: float, hi: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """n uniform draws in [lo, hi] as a B×1×1×1 tensor (broadcasts over C, H, W)."""
    return (lo + (hi - lo) * torch.rand(n, generator=generator, device=device)).view(n, 1, 1, 1)


def _coin(n: int, p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """n Bernoulli(p) draws as a B×1×1×1 bool tensor."""
    return (torch.rand(n, generator=generator, device=device) < p).view(n, 1, 1, 1)


def _gray(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, B×1×H×W."""
    r, g, b = images.unbind(1)
    return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def brightness_factors(n: int, amount: float, generator: torch.Generator) -> torch.Tensor:
    """Weak per-sample brightness factors (n,) in [1 - amount, 1 + amount] (all ones when amount is 0)."""
    if amount == 0:
        return torch.ones(n)
    return _uniform(n, 1 - amount, 1 + amount, generator, torch.device("cpu")).view(n)


def to_float(images: torch.Tensor, factors: torch.Tensor | None = None,
             out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 B×H×W×3 -> float32 B×3×H×W in [0, 1], times per-sample ``factors`` (brightness), clamped.

    One strided copy plus one in-place multiply: about 10x faster than ``permute().float().div()``
    followed by a separate brightness pass, which matters because it runs for every training batch.
    """
    b, h, w, _ = images.shape
    out = torch.empty(b, 3, h, w) if out is None else out
    out.copy_(images.permute(0, 3, 1, 2))
    scale = torch.full((b,), 1 / 255) if factors is None else factors / 255
    out.mul_(scale.view(b, 1, 1, 1))
    return out.clamp_(0, 1) if factors is not None else out


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Separable Gaussian blur with a per-sample sigma (B,), as one grouped convolution per axis."""
    b, c, h, w = images.shape
    radius = max(1, int(math.ceil(3 * float(sigma.max()))))
    x = torch.arange(-radius, radius + 1, device=images.device, dtype=images.dtype)
    kernel = torch.exp(-(x[None] ** 2) / (2 * sigma[:, None].to(images.dtype) ** 2))
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, 0)  # (B*C, K)
    flat = images.reshape(1, b * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="reflect" if w > radius else "replicate"),
                    kernel[:, None, None, :], groups=b * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="reflect" if h > radius else "replicate"),
                    kernel[:, None, :, None], groups=b * c)
    return flat.view(b, c, h, w)


def strong_photometric(images: torch.Tensor, generator: torch.Generator,
                       cfg: AugmentConfig | None = None) -> torch.Tensor:
    """Strong view of a float batch B×3×H×W in [0, 1]: colour jitter, blur and grayscale per sample.

    Works on any device (``generator`` must live on the images' device); geometry is untouched.
    """
    cfg = cfg or AugmentConfig()
    n, dev = images.shape[0], images.device
    out = images
    if cfg.jitter_prob > 0:
        apply = _coin(n, cfg.jitter_prob, generator, dev)
        jb, jc, js = cfg.jitter_brightness, cfg.jitter_contrast, cfg.jitter_saturation
        jittered = (out * _uniform(n, 1 - jb, 1 + jb, generator, dev)).clamp(0, 1)
        mean = _gray(jittered).mean(dim=(1, 2, 3), keepdim=True)
        jittered = (mean + (jittered - mean) * _uniform(n, 1 - jc, 1 + jc, generator, dev)).clamp(0, 1)
        gray = _gray(jittered)
        jittered = (gray + (jittered - gray) * _uniform(n, 1 - js, 1 + js, generator, dev)).clamp(0, 1)
        out = torch.where(apply, jittered, out)
    if cfg.grayscale_prob > 0:
        out = torch.where(_coin(n, cfg.grayscale_prob, generator, dev), _gray(out).expand_as(out), out)
    if cfg.blur_prob > 0:
        apply = _coin(n, cfg.blur_prob, generator, dev)
        sigma = _uniform(n, *cfg.blur_sigma, generator, dev).view(n)
        out = torch.where(apply, gaussian_blur(out, sigma), out)
    return out.contiguous()


def cutmix_boxes(n: int, height: int, width: int, prob: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CutMix plan: a B×H×W bool mask of pixels taken from sample ``index[b]`` and that index (B,).

    Box area is uniform in [0, 1/2] of the image with a random aspect; samples not drawn get an
    empty box. Targets (labels or pseudo-labels) must be mixed with the same mask and index.
    """
    dev = generator.device
    index = torch.roll(torch.arange(n, device=dev), 1)
    area = torch.rand(n, generator=generator, device=dev) * 0.5
    aspect = torch.exp((torch.rand(n, generator=generator, device=dev) - 0.5) * math.log(4))
    bh = (torch.sqrt(area / aspect) * height).clamp(max=height)
    bw = (torch.sqrt(area * aspect) * width).clamp(max=width)
    y0 = torch.rand(n, generator=generator, device=dev) * (height - bh)
    x0 = torch.rand(n, generator=generator, device=dev) * (width - bw)
    ys = torch.arange(height, device=dev).view(1, height, 1)
    xs = torch.arange(width, device=dev).view(1, 1, width)
    inside = ((ys >= y0.view(n, 1, 1)) & (ys < (y0 + bh).view(n, 1, 1))
              & (xs >= x0.view(n, 1, 1)) & (xs < (x0 + bw).view(n, 1, 1)))
    drawn = torch.rand(n, generator=generator, device=dev) < prob
    return inside & drawn.view(n, 1, 1), index


def apply_cutmix(images: torch.Tensor, box: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Paste ``images[index]`` into ``images`` where ``box`` (B×H×W) is set; works for B×C×H×W or B×H×W."""
    mask = box if images.dim() == 3 else box.unsqueeze(1)
    return torch.where(mask, images[index], images)
