"""What ``dpdm data prepare`` does to each image: decode, convert to L or RGB, make square, encode as PNG.

The crop and resize arithmetic is that of EDM's ``dataset_tool.py`` (``center_crop``, ``center_crop_wide``,
``scale``; ``../shared/edm_ref/README.md`` §8) and of ADM's ``center_crop_arr`` (guided-diffusion
``image_datasets.py``), on PIL images.

Each image is converted to grayscale (``L``) or RGB: ``Spec.channels`` is 1 or 3 (``dpdm.data.prepare`` picks the
source's own channel count for arrays and RGB for image files, as EDM's center-crop does; ImageNet holds grayscale
and CMYK JPEGs). Alpha is dropped; 16-bit and float images are skipped. EXIF orientation is not applied (EDM does
not either). Then the transform (``TRANSFORMS``) makes it square:

- ``none``: kept as it is; with ``resolution`` a square image of another size is LANCZOS-resized to it (EDM's
  ``scale``), and a non-square one is an error (EDM would stretch it) that names the file and the transforms;
  without ``resolution`` every image must already have the size of the first one, square and a power of two.
- ``center-crop``: EDM's ``center_crop``: the central ``min(w, h)`` square, LANCZOS-resized to R × R (EDM's ImageNet
  64 × 64 is ``--transform=center-crop --resolution=64x64``).
- ``center-crop-wide``: EDM's ``center_crop_wide`` for a W × H resolution (``"WxH"``; a bare ``R`` means R × R/2):
  ``ch = round(W·h/w)`` rows are cut from the middle of the image (all of its width), that strip is LANCZOS-resized
  to W × H and centred on a black W × W canvas. Exactly EDM's arithmetic: ``ch`` is the strip's height at output
  width W but is taken in input rows, so the strip keeps the W:H shape only for images W wide. Images narrower than
  W, or with ``ch < H``, are skipped (EDM skips them silently; here they are listed).
- ``center-crop-adm``: ADM's ``center_crop_arr``: halve with BOX while the short side is at least 2R,
  BICUBIC-resize so the short side is R, then take the central R × R.

``convert_item`` does all of it for one payload and ``convert_chunk`` for a list: they run in the worker
processes of ``dpdm.data.prepare``, so this module imports neither torch nor the sources. Files Pillow cannot
decode and images too small for ``center-crop-wide`` come back as ``("skip", reason)``; a non-square image under
``none`` as ``("error", message)``.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from dpdm.core.errors import DpdmError, did_you_mean
from dpdm.core.io.storage import first_line

TRANSFORMS = ("none", "center-crop", "center-crop-wide", "center-crop-adm")
GRAY_MODES = ("1", "L", "LA", "La")


# --- options -------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """What every worker does to an item: the transform, the output width × height and the channel count."""

    transform: str
    width: int | None
    height: int | None
    channels: int


def parse_resolution(resolution, transform: str) -> tuple[int, int] | None:
    """``(width, height)`` from ``resolution`` (``64``, ``"64"``, ``"64x64"`` or ``"512,384"``), checked for
    ``transform``: square for all but ``center-crop-wide`` (where a bare ``R`` is R × R/2), a power of two wide."""
    if transform not in TRANSFORMS:
        raise DpdmError(f"unknown transform {transform!r}; choose one of {', '.join(TRANSFORMS)}."
                        f"{did_you_mean(transform, TRANSFORMS)}")
    if resolution is None or resolution == "":
        if transform != "none":
            raise DpdmError(f"--transform {transform} needs --resolution, e.g. --resolution 64")
        return None
    text = str(resolution).strip().lower()
    parts = text.replace(",", "x").split("x")
    if len(parts) not in (1, 2) or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise DpdmError(f"--resolution must be a size such as 64 or 64x64, got {resolution!r}")
    width = int(parts[0])
    height = int(parts[1]) if len(parts) == 2 else (width // 2 if transform == "center-crop-wide" else width)
    if width & (width - 1):
        lower = 1 << (width.bit_length() - 1)
        raise DpdmError(f"--resolution {resolution}: EDM datasets hold square images a power of two wide; "
                        f"use {lower} or {lower * 2}")
    if transform == "center-crop-wide":
        if not 0 < height <= width:
            raise DpdmError(f"--resolution {resolution}: center-crop-wide needs WxH with 0 < H <= W "
                            f"(the strip is padded to W x W), e.g. 512x384")
    elif height != width:
        raise DpdmError(f"--resolution {resolution}: --transform {transform} makes square images; give one size "
                        f"such as {width}, or use --transform center-crop-wide for a W x H strip on a square canvas")
    return width, height


# --- transforms (PIL images in mode L or RGB) -----------------------------------------------------------------------


class Refused(Exception):
    """An image the transform cannot make into an EDM image: an error for the whole conversion."""


def transform_none(image: Image.Image, width: int | None, height: int | None) -> Image.Image:
    """No crop: the image as it is, or LANCZOS-resized to ``width`` × ``height`` if it is square (EDM's ``scale``)."""
    if width is None or image.size == (width, height):
        return image
    if image.width != image.height:
        raise Refused(f"is {image.width}x{image.height}, not square; pass --transform center-crop (or "
                      f"center-crop-adm, center-crop-wide) to crop it to {width}x{height}")
    return image.resize((width, height), Image.Resampling.LANCZOS)


def center_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """EDM's ``center_crop``: the central ``min(w, h)`` square, LANCZOS-resized to ``width`` × ``height``."""
    w, h = image.size
    crop = min(w, h)
    left, top = (w - crop) // 2, (h - crop) // 2  # EDM: rows (h - crop) // 2 : (h + crop) // 2
    return image.crop((left, top, left + crop, top + crop)).resize((width, height), Image.Resampling.LANCZOS)


def center_crop_wide(image: Image.Image, width: int, height: int) -> Image.Image | str:
    """EDM's ``center_crop_wide``: the central ``round(width·h/w)`` rows, LANCZOS-resized to ``width`` × ``height``
    and centred on a black ``width`` × ``width`` canvas; a reason string for images too small (EDM skips them)."""
    w, h = image.size
    ch = int(np.round(width * h / w))
    if w < width or ch < height:
        return (f"too small for center-crop-wide {width}x{height}: it is {w}x{h} (needs width >= {width} and "
                f"round({width}*h/w) = {ch} >= {height})")
    top = (h - ch) // 2  # EDM: rows (h - ch) // 2 : (h + ch) // 2
    strip = image.crop((0, top, w, top + ch)).resize((width, height), Image.Resampling.LANCZOS)
    canvas = Image.new(image.mode, (width, width))  # black
    canvas.paste(strip, (0, (width - height) // 2))
    return canvas


def center_crop_adm(image: Image.Image, width: int, height: int) -> Image.Image:
    """ADM's ``center_crop_arr`` (guided-diffusion): BOX-halve while the short side is >= 2R, BICUBIC-resize so the
    short side is R, then the central R × R (R = ``width`` = ``height``)."""
    size = width
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.Resampling.BICUBIC)
    left, top = (image.width - size) // 2, (image.height - size) // 2
    return image.crop((left, top, left + size, top + size))


TRANSFORM_FNS = {"none": transform_none, "center-crop": center_crop, "center-crop-wide": center_crop_wide,
                 "center-crop-adm": center_crop_adm}


# --- the per-item work (runs in the worker processes) ---------------------------------------------------------------


def _decode(payload) -> Image.Image:
    """A loaded PIL image from encoded file bytes or a uint8 ``(H, W, C)`` array."""
    if isinstance(payload, np.ndarray):
        return Image.fromarray(payload[..., 0], "L") if payload.shape[-1] == 1 else Image.fromarray(payload, "RGB")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # EXIF, palette-transparency and size warnings: the image still decodes
        image = Image.open(io.BytesIO(payload))
        image.load()
    return image


def _to_mode(image: Image.Image, channels: int) -> Image.Image:
    """The image as grayscale (``L``) for ``channels`` 1 or RGB for 3; alpha is dropped."""
    target = "L" if channels == 1 else "RGB"
    if image.mode == target:
        return image
    if image.mode in ("P", "PA"):
        image = image.convert("RGBA")  # a palette with transparency converts cleanly only through RGBA
    return image.convert(target)


def convert_item(payload, spec: Spec) -> tuple:
    """One item: ``("ok", png, (w, h), was_gray)``, ``("skip", reason)`` or ``("error", message)``.

    ``payload`` is file bytes, a uint8 ``(H, W, C)`` array, or a string saying why the file could not be read.
    """
    if isinstance(payload, str):
        return ("skip", payload)
    try:
        image = _decode(payload)
    except UnidentifiedImageError:
        return ("skip", "cannot decode (Pillow does not recognise its contents as an image)")
    except Exception as exc:  # truncated or corrupt: Pillow raises many types
        return ("skip", f"cannot decode ({first_line(exc)})")
    if image.mode.startswith(("I", "F")):
        return ("skip", f"unsupported mode {image.mode} (16-bit or float); save it as 8-bit")
    gray = image.mode in GRAY_MODES
    try:
        out = TRANSFORM_FNS[spec.transform](_to_mode(image, spec.channels), spec.width, spec.height)
    except Refused as exc:
        return ("error", str(exc))
    if isinstance(out, str):
        return ("skip", out)
    buffer = io.BytesIO()
    out.save(buffer, format="png", compress_level=0, optimize=False)  # EDM: uncompressed PNG
    return ("ok", buffer.getvalue(), out.size, gray)


def convert_chunk(payloads: list, spec: Spec) -> list[tuple]:
    """``convert_item`` over a chunk of payloads, in order (the task a worker process runs)."""
    return [convert_item(p, spec) for p in payloads]

