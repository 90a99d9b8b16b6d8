"""The option groups shared by the commands that read a dataset or a cache (extract, fuse-train, finetune, sweep).

Flow: cli.options -> the commands (cli.commands, cli.sweeping). Declared once, so every command spells
a flag, its default and its help the same way.
"""

from __future__ import annotations

from pathlib import Path

import click


def data_options(f):
    """The flags that choose a dataset, shared by every command that reads one."""
    options = [
        click.option("--dataset", default="digits", show_default=True,
                     help="cifar10, folder, or digits (scikit-learn's bundled 8x8 digits, offline)."),
        click.option("--data-dir", type=click.Path(path_type=Path),
                     help="Where the data lives (cifar10: holds cifar-10-batches-py/; folder: one sub-folder per class, optionally under train/ and test/)."),
        click.option("--download", is_flag=True, help="cifar10: download the data into --data-dir if missing."),
        click.option("--limit-train", type=int, help="Stratified subset of N training images."),
        click.option("--limit-test", type=int, help="Stratified subset of M test images."),
        click.option("--test-fraction", type=float, default=0.2, show_default=True,
                     help="digits and folders without train/test: share of images held out for test."),
        click.option("--seed", type=int, default=0, show_default=True, help="Seed for splits, subsets and random weights."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def feature_options(f):
    """The flags that pick a cache file: weights and preprocessing."""
    options = [
        click.option("--weights", default="imagenet", show_default=True,
                     help="imagenet (torchvision's default weights / timm's default tag), a weights tag "
                          "(IMAGENET1K_V2, a1_in1k ...: featcache backbones NAME lists them), random, or the path "
                          "of a local state dict."),
        click.option("--image-size", type=int, default=None,
                     help="Input size in pixels (square) [default: the backbone's: 224 for the study backbones, "
                          "what the weights were trained at for any other]."),
        click.option("--resize", default="center-crop", show_default=True,
                     help="center-crop: shorter side to --image-size / --crop-pct, then centre crop; stretch: "
                          "resize to a square."),
        click.option("--crop-pct", type=float, default=None,
                     help="Share of the resized image the centre crop keeps [default: the weights' own; 1 for the "
                          "study backbones]."),
        click.option("--interpolation", default=None,
                     help="bilinear or bicubic [default: the weights' own; bilinear for the study backbones]."),
        click.option("--mean", default=None, metavar="R,G,B", help="Normalisation mean [default: the weights' own]."),
        click.option("--std", default=None, metavar="R,G,B", help="Normalisation std [default: the weights' own]."),
        click.option("--pooling", default="avg", show_default=True,
                     help="Global pooling of each tap: avg, max or avgmax; cls (a transformer's class token)."),
        click.option("--precision", default="auto", show_default=True,
                     help="auto (bf16/fp16 autocast on a GPU; on a CPU bf16 where it multiplies bf16 "
                          "natively, else fp32), fp32, bf16 or fp16."),
        click.option("--dtype", default="float16", show_default=True, help="Storage dtype: float16 or float32."),
        click.option("--cache-dir", type=click.Path(path_type=Path), default=Path("cache"), show_default=True),
    ]
    for option in reversed(options):
        f = option(f)
    return f


# --skip-bad-images, on extract and on the commands whose --extract extracts first (the bad-image error names it)
skip_bad_images_option = click.option(
    "--skip-bad-images", is_flag=True,
    help="Leave out image files that cannot be read (listed, and recorded in the cache) instead of stopping.")
