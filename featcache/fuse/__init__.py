"""Fuse: select cached taps, normalise each, concatenate, and train interchangeable heads.

Stage 5 of 8 (extraction, runs -> **fuse** -> finetuning, sweeping -> reporting). ``fusion``
builds the fused matrix, ``heads`` is the head registry, ``evaluate`` the honest splits and
metrics, ``stream`` the out-of-core path, ``saved`` how heads save and load themselves, ``train``
the fuse-train run. Writes run folders through runs.
"""
