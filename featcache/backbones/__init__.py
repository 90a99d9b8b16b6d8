"""Backbones: the registry of declared networks with their taps, discovery of any other, and the tap model.

Stage 2 of 8 (data -> **backbones** -> extraction). Hands the next stages a network cut at
its taps (``tap_model``), the pooling, and the device/precision rules. Imports only data
and errors.
"""

import sys as _sys
import types as _types


class _BackbonesModule(_types.ModuleType):
    """``featcache.backbones(...)`` is the command ``featcache backbones --all`` from Python; its modules stay
    attributes."""

    def __call__(self, pattern: str = "*", sizes: bool = False):
        """Every usable backbone name matching ``pattern`` with its source, as a DataFrame; ``sizes``: also its
        parameters and input size, from a build on the meta device (nothing downloaded)."""
        import pandas as pd

        from featcache.backbones.registry import listing
        from featcache.backbones.sources import size_of

        table = pd.DataFrame(listing(pattern), columns=["backbone", "source"])
        if sizes:
            measured = [size_of(n) for n in table["backbone"]]
            table["params"] = [p for p, _ in measured]
            table["input"] = [s for _, s in measured]
        return table


_sys.modules[__name__].__class__ = _BackbonesModule
