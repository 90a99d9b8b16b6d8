"""Sweep: which taps of which backbones, fused how, with which head, answered from one load of the caches.

Fourth stage, beside fuse (data -> backbones -> extraction -> **sweep** -> records). Every single
tap, pair or explicit combination, with the linear heads solved on the device (solvers), k-NN
(knn), few-shot draws and several seeds; the table it writes is the answer, and the best
combinations become ordinary runs through fuse-train.
"""

import sys
import types


class _CallableModule(types.ModuleType):
    """``featcache.sweep(...)`` is the Python API's sweep even once this package is imported (the
    package then shadows the API's lazy attribute of the same name)."""

    def __call__(self, **kwargs):
        from featcache.api import sweep

        return sweep(**kwargs)


sys.modules[__name__].__class__ = _CallableModule
