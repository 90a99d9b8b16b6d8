"""Data: datasets (cifar10, folder, digits), image decoding, preprocessing, augmentation.

First stage of the flow (**data** -> backbones -> extraction -> fuse / finetuning -> reporting).
Hands the next stage uint8 images (in memory, or decoded from files) with labels, and the one
preprocessing rule (``PreprocessConfig``, ``to_input``). Knows nothing of networks or heads.
"""
