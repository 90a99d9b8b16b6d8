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

import io
import os
import warnings
from pathlib import Path

import numpy as np

from featcache.data.preprocess import PreprocessConfig, resize_plan
from featcache.data.safe import UnsafeFile, read_regular
from featcache.errors import DataError, FeatcacheError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")

WIDE_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


class BadImage(DataError):
    """A file that is not a readable image; the message names it."""


class Blob:
    """An image that is not a file of its own: a member of a tar shard, a cell of an Arrow table, an item of a
    torchvision dataset. It stands where a file's path stands (``Split.files``, :func:`load_image`,
    :func:`decode_rgb`); :meth:`read` gives its encoded bytes (decoded by the same fast path as a file's),
    or pixels (a PIL image or an array) where the source holds them decoded; ``str()`` names it in errors."""

    def read(self):
        raise NotImplementedError


def _blob_value(blob: Blob):
    try:
        return blob.read()
    except BadImage:
        raise
    except Exception as exc:  # a source's reader fails in its own way: one line naming the image
        raise BadImage(f"cannot read image {blob}: {type(exc).__name__}: {exc}") from None


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

    if isinstance(path, Blob):
        value = _blob_value(path)
        if isinstance(value, Image.Image):
            return _to_rgb(value)
        if isinstance(value, np.ndarray):
            return _array_rgb(value, path)
        if not value:
            raise BadImage(f"cannot read image {path}: empty")
    else:
        value = file_bytes(path)
        if not value:
            raise BadImage(f"cannot read image {path}: empty file")
    try:
        with warnings.catch_warnings():
            # Large photos are legitimate here; Pillow still refuses real decompression bombs with an error.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            buffer = io.BytesIO(value)
            with Image.open(buffer) as image:
                image.load()
                return _to_rgb(image)
    except Exception as exc:  # Pillow raises many types for bad files: each becomes one line naming the file
        reason = str(exc).replace(f" {buffer!r}", "")  # Pillow names the buffer it read, not the file
        raise BadImage(f"cannot read image {path}: {type(exc).__name__}: {reason}") from None


def file_bytes(path) -> bytes:
    """An image file's bytes: a regular file within featcache's size limit (a device, FIFO or socket named as
    an image is refused before anything blocks); :class:`BadImage` in one line otherwise."""
    try:
        return read_regular(path, "image")
    except FileNotFoundError:
        raise BadImage(f"image {path} is missing (moved or deleted after the folder was listed)") from None
    except UnsafeFile as exc:
        raise BadImage(str(exc)) from None


def _array_rgb(values: np.ndarray, name):
    """Pixels a source holds decoded: (H, W), (H, W, 1|3|4) or (1|3, H, W), uint8 or wider -> RGB PIL image."""
    from PIL import Image

    values = np.asarray(values)
    if values.ndim == 3 and values.shape[0] in (1, 3) and values.shape[-1] not in (1, 3, 4):
        values = values.transpose(1, 2, 0)  # CHW, as SVHN and STL-10 store them
    if values.ndim == 3 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim not in (2, 3) or (values.ndim == 3 and values.shape[-1] not in (3, 4)):
        raise BadImage(f"cannot read image {name}: an array of shape {values.shape} is not an image")
    if values.dtype != np.uint8:
        top = 1.0 if values.dtype.kind == "f" and values.max() <= 1.0 else (65535.0 if values.max() > 255 else 255.0)
        values = np.clip(values.astype(np.float64) / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(values)))


FAST_SUFFIXES = (".jpg", ".jpeg", ".png")  # what torchvision's libjpeg-turbo / libpng decoders read


def decode_rgb(path) -> np.ndarray:
    """Decode a file to RGB uint8 (H, W, 3) with the fastest correct decoder.

    JPEG and 8-bit PNG go through torchvision's decoders (libjpeg-turbo, libpng: about twice
    PIL's speed on JPEG, measured in benchmarks/RESULTS.md); everything else, and anything
    those refuse or would read differently (16-bit PNG, CMYK JPEG, images over PIL's
    decompression-bomb limit), through PIL as :func:`open_rgb` does. A test checks both give
    the same pixels. :class:`BadImage` names a file neither can read.
    """
    fast = _torchvision_rgb(path)
    if fast is not None:
        return fast.permute(1, 2, 0).numpy()
    return np.asarray(open_rgb(path), dtype=np.uint8)


def _torchvision_rgb(path):
    """The torchvision decode (uint8 tensor (3, H, W)) of a plain JPEG or PNG, or None where PIL should decide."""
    import torch
    from torchvision.io import ImageReadMode, decode_image

    data = _plain_bytes(path)
    if data is None:
        return None
    try:
        image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return None
    if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
        return None
    return image


def jpeg_bytes(path) -> bytes | None:
    """The file's bytes if it is a plain JPEG that torchvision's decoders read as PIL does, else None."""
    data = _plain_bytes(path)
    return data if data is not None and data[:2] == b"\xff\xd8" else None


def _plain_bytes(path) -> bytes | None:
    """A JPEG's or 8-bit PNG's bytes, if torchvision may decode it (gray or colour, within PIL's
    decompression-bomb limit); None where PIL should decide. A missing file is :class:`BadImage`."""
    from PIL import Image

    if isinstance(path, Blob):  # no name to go by: the header below tells a JPEG or PNG
        data = _blob_value(path)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            return None
        data = bytes(data)
    else:
        name = os.fspath(path)
        if os.path.splitext(name)[1].lower() not in FAST_SUFFIXES:
            return None
        data = file_bytes(name)
    header = _header(data)
    if header is None:
        return None  # not a plain 8-bit JPEG or PNG (or empty): PIL decides, and names what is wrong
    h, w, components = header
    if components not in (1, 3) or (Image.MAX_IMAGE_PIXELS and h * w > Image.MAX_IMAGE_PIXELS):
        return None  # CMYK: PIL's conversion is the reference; a huge image: PIL's decompression-bomb rule
    return data


def _header(data: bytes) -> tuple[int, int, int] | None:
    """(height, width, colour components) from an 8-bit JPEG's frame header or PNG's IHDR, else None."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) >= 26:
        if data[24] != 8:
            return None  # 16-bit (or 1-4 bit) samples: PIL's conversion is the reference
        colour_type = data[25]  # 0 gray, 2 RGB, 3 palette, 4 gray+alpha, 6 RGBA
        return int.from_bytes(data[20:24], "big"), int.from_bytes(data[16:20], "big"), 1 if colour_type in (0, 4) else 3
    i = 2
    while data[:2] == b"\xff\xd8" and i + 9 < len(data) and data[i] == 0xFF:
        marker, length = data[i + 1], int.from_bytes(data[i + 2 : i + 4], "big")
        if marker in (0xC0, 0xC1, 0xC2):  # start of frame: precision, height, width, components
            return int.from_bytes(data[i + 5 : i + 7], "big"), int.from_bytes(data[i + 7 : i + 9], "big"), data[i + 9]
        i += 2 + length
    return None


def load_image(path, pre: PreprocessConfig, resize: bool = True) -> np.ndarray:
    """Decode one file to RGB uint8 and, unless told not to, resize it as ``pre`` says (PIL bilinear)."""
    pixels = decode_rgb(path)
    return fit(pixels, pre) if resize else np.ascontiguousarray(pixels)


def fit(pixels: np.ndarray, pre: PreprocessConfig) -> np.ndarray:
    """RGB uint8 (H, W, 3) resized and cropped to the input size by the one rule; as it is when it fits already."""
    from PIL import Image

    size = pre.image_size
    h, w = pixels.shape[:2]
    if (h, w) == (size, size):
        return np.ascontiguousarray(pixels)
    nh, nw, top, left = resize_plan(h, w, pre)
    resample = Image.BICUBIC if pre.interpolation == "bicubic" else Image.BILINEAR
    image = Image.fromarray(np.ascontiguousarray(pixels)).resize((nw, nh), resample)
    return np.asarray(image.crop((left, top, left + size, top + size)), dtype=np.uint8).copy()


def decoded_or_error(path, pre: PreprocessConfig):
    """(uint8 tensor (S, S, 3), "") for a readable file; (zeros, its one-line error) for one that is not."""
    import torch

    try:
        return torch.from_numpy(load_image(path, pre)), ""
    except BadImage as exc:
        size = pre.image_size
        return torch.zeros((size, size, 3), dtype=torch.uint8), str(exc)


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
        return decoded_or_error(self.files[i], self.pre)


def files_under(folder) -> list[tuple[tuple[str, ...], os.DirEntry]]:
    """Every file under ``folder``, recursively, as (its path's parts below ``folder``, its directory entry),
    in pathlib's order: ``sorted(p for p in Path(folder).rglob("*") if p.is_file())``, without a Path
    object per file (sorting and relating 16,384 Paths took 0.25 s; a test checks both agree). Symlinked
    files count, symlinked folders are not entered, as ``rglob`` does."""
    out, todo = [], [((), os.fspath(folder))]
    while todo:
        parts, directory = todo.pop()
        try:
            entries = list(os.scandir(directory))
        except PermissionError:
            continue  # an unreadable folder is passed over, as rglob does
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                todo.append(((*parts, entry.name), entry.path))
            elif entry.is_file():
                out.append(((*parts, entry.name), entry))
    out.sort(key=lambda item: item[0])
    return out


def images_in(folder: Path) -> list[Path]:
    """Every image file under ``folder``, recursively, in name order.

    Hidden files and folders are not photos: macOS's ``._name.jpg`` AppleDouble files, ``.thumbnails/`` ...
    """
    return [Path(entry.path) for parts, entry in files_under(folder)
            if os.path.splitext(parts[-1])[1].lower() in IMAGE_SUFFIXES and not any(p.startswith(".") for p in parts)]


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
