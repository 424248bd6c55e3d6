"""A person's digit image -> a 28x28 MNIST-style array, the way MNIST's digits were prepared.

MNIST's digits are white on black, their bounding box scaled into 20x20 with the aspect ratio
kept, then placed in a 28x28 field so that their centre of mass is at the centre. Pillow and
numpy only (no torch): the preprocessing is tested on its own, quickly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dptrain.errors import UserError

FIELD = 28  # MNIST's image side, pixels
BOX = 20  # the side of the box the digit is scaled into
INK = 0.25  # a pixel is part of the digit above this fraction of the strongest ink
# Pillow's modes of one channel wider than 8 bits: 16-bit (PNG, TIFF), 32-bit integer, float.
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


class ImageError(UserError):
    """A file that cannot be read as a digit image."""


def load_gray(path: Path) -> np.ndarray:
    """The image as float grey levels in [0, 1], transparency flattened onto white."""
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file")
        with warnings.catch_warnings():
            # Pillow warns above MAX_IMAGE_PIXELS and refuses above twice that: both are
            # refused here, a digit photo needs far fewer pixels than a decompression bomb.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(path)
        with image:
            image = ImageOps.exif_transpose(image)  # phone photos store their rotation in EXIF
            if image.mode in WIDE_MODES:
                return full_scale(np.asarray(image), image.mode)
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                image = Image.new("RGBA", rgba.size, "white")
                image.alpha_composite(rgba)
            gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: a folder, not an image file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image Pillow can read (PNG or JPEG expected)") from None
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise ImageError(f"{path}: too large an image to read safely (more than "
                         f"{Image.MAX_IMAGE_PIXELS:,} pixels); scale it down") from None
    except (OSError, SyntaxError, ValueError) as e:  # truncated or corrupt image data
        raise ImageError(f"{path}: cannot read the image ({e})") from None
    return gray


def full_scale(levels: np.ndarray, mode: str) -> np.ndarray:
    """Grey levels of a 16-bit, 32-bit integer or float image, in [0, 1].

    Pillow's conversion to 8 bits clips them at 255 (a 16-bit digit turned all white, a float
    one in [0, 1] all black). 16-bit images span 0..65535; for 32-bit integers and floats,
    whose range the file does not say, the full scale is the smallest of 1, 255, 65535 and
    2^32 - 1 that holds the brightest level (the darkest counts as 0 where it is negative).
    """
    values = np.nan_to_num(levels.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    values -= min(float(values.min(initial=0.0)), 0.0)
    if mode.startswith("I;16"):
        top = 65535.0
    else:
        brightest = float(values.max(initial=0.0))
        top = next((s for s in (1.0, 255.0, 65535.0, 2.0 ** 32 - 1) if brightest <= s), brightest)
    return np.clip(values / top, 0.0, 1.0).astype(np.float32)


def to_ink(gray: np.ndarray) -> np.ndarray:
    """Ink in [0, 1] on a background of 0: inverted when the background (the border) is light."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    ink = 1.0 - gray if background > 0.5 else gray
    ink = ink - min(background, 1.0 - background)  # a grey paper background becomes 0
    peak = float(ink.max())
    if peak < 0.1:
        raise ImageError("no digit found: the image is blank or has no contrast")
    return np.clip(ink / peak, 0.0, 1.0)


def crop_to_digit(ink: np.ndarray) -> np.ndarray:
    """The bounding box of the pixels with clear ink (faint noise around it is ignored)."""
    rows, cols = np.nonzero(ink > INK)
    return ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]


def fit_box(digit: np.ndarray, box: int = BOX) -> np.ndarray:
    """Scale so that the longer side is `box` pixels, keeping the aspect ratio (antialiased)."""
    from PIL import Image

    height, width = digit.shape
    scale = box / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    image = Image.fromarray(np.round(digit * 255).astype(np.uint8))
    return np.asarray(image.resize(size, Image.Resampling.LANCZOS), dtype=np.float32) / 255.0


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    """(row, column) of the ink's centre of mass, in pixels."""
    total = image.sum()
    rows, cols = np.indices(image.shape)
    return float((rows * image).sum() / total), float((cols * image).sum() / total)


def place_centred(digit: np.ndarray, field: int = FIELD) -> np.ndarray:
    """Put `digit` in a field x field black image with its centre of mass at the centre."""
    out = np.zeros((field, field), dtype=np.float32)
    height, width = digit.shape
    row, col = centre_of_mass(digit)
    # The shift is kept inside the field: a lopsided digit is moved as far as it can go.
    top = int(np.clip(round(field / 2 - row), 0, field - height))
    left = int(np.clip(round(field / 2 - col), 0, field - width))
    out[top:top + height, left:left + width] = digit
    return out


def prepare(gray: np.ndarray) -> np.ndarray:
    """Grey levels in [0, 1] -> the 28x28 MNIST-style float32 image in [0, 1], white on black."""
    return place_centred(fit_box(crop_to_digit(to_ink(gray))))


def prepare_file(path: Path) -> np.ndarray:
    """load_gray + prepare; an unreadable file or blank image is an ImageError naming the file."""
    try:
        return prepare(load_gray(path))
    except ImageError as e:
        message = str(e)
        raise ImageError(message if message.startswith(str(path)) else f"{path}: {message}") from None
