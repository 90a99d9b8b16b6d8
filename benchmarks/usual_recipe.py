"""The studies' usual recipe, shared by the benchmarks: what featcache is compared against.

Per-image PIL resize to the input size in a DataLoader, ToTensor, ImageNet Normalize, and
a plain eager torchvision model in fp32 with its classifier removed.
"""

from __future__ import annotations

import torch

from featcache.backbones.registry import BACKBONES
from featcache.backbones.weights import build_backbone

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


class PilImages(torch.utils.data.Dataset):
    """uint8 (N, H, W, 3) images -> normalised tensors, one PIL image at a time.

    With ``labels`` each item is ``(image, label)``; without, the image alone.
    """

    def __init__(self, images, size, labels=None):
        from torchvision import transforms

        self.images, self.labels = images, labels
        self.transform = transforms.Compose([
            transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(MEAN, STD),
        ])

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        image = self.transform(Image.fromarray(self.images[i]))
        return image if self.labels is None else (image, int(self.labels[i]))


def trunk(name: str, device):
    """The backbone with its classifier replaced by Identity, as the studies build it (timm: reset_classifier)."""
    spec = BACKBONES.lookup(name)
    net = build_backbone(spec, "random", 0)
    if spec.model_source == "timm":
        net.reset_classifier(0)
    else:
        for prefix in spec.head_prefixes:
            setattr(net, prefix.split(".")[0], torch.nn.Identity())
    return net.to(device).eval()
