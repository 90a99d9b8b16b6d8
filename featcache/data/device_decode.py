"""JPEG files decoded where the network runs: bytes from the workers, batched ``decode_jpeg`` on the device.

Inside data (images -> **device_decode** -> extraction passes). For a GPU run, DataLoader
workers only read files; a batch of JPEGs is decoded in one ``torchvision.io.decode_jpeg``
call on the GPU (nvjpeg), and each image is resized there by the one resize rule
(:func:`featcache.data.preprocess.resized`) and rounded to uint8, as PIL's resize rounds. Files
that are not plain JPEGs (PNG, CMYK, huge, unreadable) are decoded by the workers as before
(:class:`featcache.data.images.FileImages`), so every odd or broken file is handled the same way.
"""

from __future__ import annotations

from featcache.data.images import BadImage, FileImages, decoded_or_error, jpeg_bytes
from featcache.data.preprocess import PreprocessConfig, resized


class FileBytes(FileImages):
    """Map-style dataset: per batch, the raw bytes of plain JPEGs and the decoded pixels of every other file.

    ``__getitems__`` returns ``(items, errors)``: each item is ``("jpeg", uint8 1-D bytes)`` or
    ``("pixels", uint8 (S, S, 3))`` (zeros for a file that failed, whose error is in ``errors``).
    """

    def __getitems__(self, indices):
        import torch

        items, errors = [], []
        for i in indices:
            try:
                data = jpeg_bytes(self.files[i])
            except BadImage:  # missing: the pixel path below names it
                data = None
            if data is not None:
                items.append(("jpeg", torch.frombuffer(bytearray(data), dtype=torch.uint8)))
                errors.append("")
            else:
                pixels, error = self[i]
                items.append(("pixels", pixels))
                errors.append(error)
        return items, errors


def decode_batch(items: list, errors: list[str], files: list, pre: PreprocessConfig, device):
    """``FileBytes`` items -> uint8 (B, S, S, 3) on ``device`` and the errors, JPEGs decoded there in one call.

    A batch the batched decoder refuses is decoded image by image, so only the broken file fails,
    and its error is the one the CPU path gives.
    """
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    size = pre.image_size
    out = torch.empty((len(items), size, size, 3), dtype=torch.uint8, device=device)
    jpegs = [k for k, (kind, _) in enumerate(items) if kind == "jpeg"]
    for k, (kind, value) in enumerate(items):
        if kind == "pixels":
            out[k] = value.to(device, non_blocking=True)
    if not jpegs:
        return out, errors
    errors = list(errors)
    try:
        decoded = decode_jpeg([items[k][1] for k in jpegs], mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        decoded = []
        for k in jpegs:
            try:
                decoded.append(decode_jpeg(items[k][1], mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    for k, image in zip(jpegs, decoded):
        if image is None:  # on the CPU, as every other file: its pixels, or zeros and its error
            pixels, errors[k] = decoded_or_error(files[k], pre)
            out[k] = pixels.to(device)
            continue
        out[k] = to_size(image, pre)
    return out, errors


def to_size(image, pre: PreprocessConfig):
    """uint8 (3, H, W) on the device -> uint8 (S, S, 3) by the one resize rule, rounded as PIL rounds."""
    if tuple(image.shape[1:]) == (pre.image_size, pre.image_size):
        return image.permute(1, 2, 0)
    x = resized(image.permute(1, 2, 0)[None], pre)[0]  # float (3, S, S) in [0, 1]
    return x.mul(255.0).round_().clamp_(0, 255).to(image.dtype).permute(1, 2, 0)
