"""featcache: extract every layer of frozen CNN backbones once, then fuse and compare heads.

The flow: datasets -> backbones -> extract -> store (HDF5 cache) -> fusion -> heads -> runs.
"""

__version__ = "0.1.0"
