"""Training images for the fine-tune path: augmentation presets and loaders.

Without augmentation an image takes exactly the extraction's path (in-memory images are
resized on the device by :func:`featcache.data.preprocess.to_input`, files by
:func:`featcache.data.images.load_image`), so a fine-tune evaluates the pixels the cache saw.
"""

from __future__ import annotations

import numpy as np

from featcache.data.images import BadImage, load_image
from featcache.data.preprocess import to_input
from featcache.errors import FeatcacheError

AUGMENTS = ("none", "basic", "heavy")


def augmentation(name: str, size: int, resize: str):
    """torchvision transforms v2 on uint8 CHW tensors -> uint8 (3, size, size); None for ``none``.

    Without augmentation images take exactly the extraction path (see :class:`SplitImages`).
    """
    from torchvision.transforms import v2

    if name == "none":
        return None
    if name == "basic":  # the ResNet50 + MobileNetV2 study: resize, random crop, flip
        fit = [v2.Resize((size, size), antialias=True)] if resize == "stretch" else \
            [v2.Resize(size, antialias=True), v2.CenterCrop(size)]
        return v2.Compose([*fit, v2.RandomCrop(size, padding=size // 8, padding_mode="reflect"),
                           v2.RandomHorizontalFlip()])
    # heavy, the footwear study: rotation 20, flip, RandomResizedCrop, affine 20
    return v2.Compose([v2.RandomRotation(20), v2.RandomHorizontalFlip(), v2.RandomResizedCrop(size, antialias=True),
                       v2.RandomAffine(20)])


class SplitImages:
    """Rows of a split -> (uint8 HWC image, label), decoded in DataLoader workers.

    Without a transform an in-memory image is returned as stored (resized later on the
    device) and a file is decoded and resized by :func:`~featcache.data.images.load_image`:
    the very path of extraction, so a fine-tune evaluates the pixels the cache saw.
    """

    def __init__(self, split, rows, transform, pre):
        self.split, self.rows, self.transform, self.pre = split, rows, transform, pre

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        """(uint8 HWC image, label, error): an unreadable file gives zeros and its one-line error."""
        import torch

        row = self.rows[i]
        label = int(self.split.labels[row])
        try:
            if self.transform is None:
                image = self.split.images[row] if self.split.images is not None else \
                    load_image(self.split.files[row], self.pre)
                return torch.from_numpy(np.ascontiguousarray(image)), label, ""
            image = self.split.images[row] if self.split.images is not None else \
                load_image(self.split.files[row], self.pre, resize=False)
        except BadImage as exc:
            size = self.pre.image_size
            return torch.zeros((size, size, 3), dtype=torch.uint8), label, str(exc)
        chw = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        return self.transform(chw).permute(1, 2, 0).contiguous(), label, ""


class Batches:
    """A DataLoader of :class:`SplitImages` yielding (images, labels); an unreadable file stops it in one line."""

    def __init__(self, data_loader):
        self.data_loader = data_loader

    def __len__(self):
        return len(self.data_loader)

    def __iter__(self):
        for images, labels, errors in self.data_loader:
            bad = [e for e in errors if e]
            if bad:
                raise FeatcacheError(f"{bad[0]}: fix or remove the file (fine-tuning reads every image)")
            yield images, labels


def loader(split, rows, cfg, transform, shuffle: bool, seed: int, device) -> Batches:
    import torch

    return Batches(torch.utils.data.DataLoader(
        SplitImages(split, rows, transform, cfg.features.preprocess), batch_size=cfg.batch_size, shuffle=shuffle,
        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(seed), drop_last=False,
    ))


def normalise(images, pre):
    """uint8 NHWC on the device -> float input, channels_last (the extraction's own step)."""
    return to_input(images, pre)
