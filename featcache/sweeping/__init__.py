"""Sweeping: which taps of which backbones, fused how, with which head, answered from one load of the caches.

Stage 7 of 8 (fuse -> **sweeping** -> reporting), beside finetuning. Every single tap,
pair or explicit combination, with the linear heads solved on the device (solvers, lanes),
k-NN (knn), scores that train no head (scorers), few-shot draws and several seeds; the table
it writes is the answer, and the best combinations become ordinary runs through fuse-train.
The Python API's function is ``featcache.sweep``; this package is ``featcache.sweeping``.
"""
