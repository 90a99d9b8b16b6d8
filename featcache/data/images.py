"""Image files -> RGB uint8 arrays, for every stage that reads files (extract, finetune, predict, report).

Flow: datasets (file lists) -> **images** -> extract / finetune. Messy photo folders are
the norm: grayscale, palette, CMYK and alpha images are converted to RGB the way
torchvision's ``ImageFolder`` loader does (alpha is dropped), and 16-bit images are
scaled to 8 bits instead of saturating. A file that cannot be decoded raises
:class:`BadImage` naming the file; extraction reports it in one line or, with
``--skip-bad-images``, skips it. Which files count as images (:func:`images_in`, and
:func:`image_paths` for files, folders and globs given on the command line) is decided here too.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from featcache.data.preprocess import PreprocessConfig, resize_plan
from featcache.errors import FeatcacheError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class BadImage(FeatcacheError):
    """A file that is not a readable image; the message names it."""


def _to_rgb(image):
    from PIL import Image

    if image.mode in WIDE_MODES:  # 16-bit or 32-bit grayscale: convert("RGB") would clip it to white
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F" and values.max() <= 1.0:
            top = 1.0  # float images in [0, 1]
        else:
            top = 65535.0 if image.mode.startswith("I;16") or values.max() > 255 else 255.0
        gray = np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(gray).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # Pillow warns when a palette image with transparency goes straight to RGB
    return image.convert("RGB")


def open_rgb(path):
    """Decode a file into an RGB PIL image; :class:`BadImage` if it cannot be read."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            # Large photos are legitimate here; Pillow still refuses real decompression bombs with an error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return _to_rgb(image)
    except FileNotFoundError:
        raise BadImage(f"image {path} is missing (moved or deleted after the folder was listed)") from None
    except Exception as exc:  # Pillow raises many types for bad files: each becomes one line naming the file
        reason = "empty file" if Path(path).is_file() and Path(path).stat().st_size == 0 else \
            f"{type(exc).__name__}: {exc}"
        raise BadImage(f"cannot read image {path}: {reason}") from None


def load_image(path, pre: PreprocessConfig, resize: bool = True) -> np.ndarray:
    """Decode one file to RGB uint8 (H, W, 3) and, unless told not to, resize it as ``pre`` says."""
    from PIL import Image

    image = open_rgb(path)
    if not resize:
        return np.asarray(image, dtype=np.uint8).copy()
    size = pre.image_size
    w, h = image.size
    nh, nw, top, left = resize_plan(h, w, pre)
    image = image.resize((nw, nh), Image.BILINEAR).crop((left, top, left + size, top + size))
    return np.asarray(image, dtype=np.uint8).copy()


class FileImages:
    """Map-style dataset of image files -> (uint8 (S, S, 3), error message), decoded in DataLoader workers.

    A file that cannot be decoded yields zeros and its one-line error instead of raising,
    so the main process can name it (or skip it) rather than print a worker traceback.
    """

    def __init__(self, files, pre: PreprocessConfig):
        self.files = files
        self.pre = pre

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        import torch

        try:
            return torch.from_numpy(load_image(self.files[i], self.pre)), ""
        except BadImage as exc:
            size = self.pre.image_size
            return torch.zeros((size, size, 3), dtype=torch.uint8), str(exc)



def images_in(folder: Path) -> list[Path]:
    """Every image file under ``folder``, recursively, in name order.

    Hidden files and folders are not photos: macOS's ``._name.jpg`` AppleDouble files, ``.thumbnails/`` ...
    """
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def image_paths(args) -> list[Path]:
    """Files, folders (every image inside, recursively) and glob patterns -> image files, in the order given."""
    import glob

    out: list[Path] = []
    for arg in map(str, args):
        path = Path(arg)
        if path.is_dir():
            found = images_in(path)
            if not found:
                raise FeatcacheError(f"folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            out += found
        elif path.exists():
            out.append(path)
        elif glob.has_magic(arg):
            matches = sorted(Path(m) for m in glob.glob(arg, recursive=True) if Path(m).is_file())
            if not matches:
                raise FeatcacheError(f"no file matches {arg}")
            out += matches
        else:
            raise FeatcacheError(f"no image at {path}: check the path")
    return out
