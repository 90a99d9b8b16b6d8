"""The one registry type: a name -> object mapping filled by a decorator, whose lookups fail helpfully.

Below every stage: datasets, backbones and heads are registries. Registering a name twice
warns, as timm's model registry does, so a plug-in cannot silently replace a built-in.
"""

from __future__ import annotations

import warnings

from featcache.errors import unknown


class Registry(dict):
    """A name -> object mapping filled by a decorator, whose lookups fail helpfully."""

    def __init__(self, option: str):
        super().__init__()
        self.option = option

    def register(self, name: str):
        """Decorator: ``@REGISTRY.register("name")`` stores the decorated object."""

        def decorate(obj):
            if name in self:
                warnings.warn(f"{self.option} {name!r} was registered already; the new entry replaces it", stacklevel=2)
            self[name] = obj
            return obj

        return decorate

    def lookup(self, name: str):
        """The entry called ``name``; unknown names raise :class:`FeatcacheError`."""
        try:
            return self[name]
        except KeyError:
            raise unknown(self.option, name, self) from None
