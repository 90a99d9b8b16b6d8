"""Data: the dataset sources (cifar10, folder, digits: one registry), image decoding, preprocessing, augmentation.

Stage 1 of 8 (**data** -> backbones -> extraction -> runs -> fuse -> finetuning, sweeping ->
reporting). Hands the next stage uint8 images (in memory, or decoded from files) with labels, and
the one preprocessing rule (``PreprocessConfig``, ``to_input``). A new source is one entry of
``datasets.DATASETS``. Knows nothing of networks or heads.
"""
