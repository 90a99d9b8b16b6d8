"""Discovery: the spec of any model a model source offers, found from the model itself.

Stage 2 (data -> **backbones** -> extraction), beside the declared registry. A looked-up name that is not
declared comes here, is handed to the model source that owns it (:mod:`featcache.backbones.sources`: bare
torchvision names, ``timm:NAME``, any source registered there) and leaves as an ordinary
:class:`BackboneSpec`, so everything downstream sees one kind of spec.
"""

from __future__ import annotations

import functools

from featcache.backbones.sources import owner, unknown_backbone
from featcache.backbones.spec import BackboneSpec


@functools.lru_cache(maxsize=64)
def discover(name: str, declared: tuple[str, ...] = ()) -> BackboneSpec:
    """The spec of a model a source offers; an unknown name is one line with the closest names of every
    source and of the ``declared`` names."""
    source = owner(name)
    if source is None:
        raise unknown_backbone(name, declared)
    return source.discover(name)
