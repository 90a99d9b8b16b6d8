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


def discover(name: str, declared: tuple[str, ...] = ()) -> BackboneSpec:
    """The spec of a model a source offers; an unknown name is one line with the closest names of every
    source and of the ``declared`` names. Kept once found, but for a source whose specs change in a process
    (``own:``, registered again with new weights)."""
    source = owner(name)
    if source is None:
        raise unknown_backbone(name, declared)
    return _found(name) if source.keep_specs else source.discover(name)


@functools.lru_cache(maxsize=64)
def _found(name: str) -> BackboneSpec:
    return owner(name).discover(name)


discover.cache_clear = _found.cache_clear  # what tests that register a source call
