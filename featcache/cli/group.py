"""The ``featcache`` command group: how a user error becomes one line and exit status 2.

Every command registers on :data:`cli` (the stages' commands, made from their requests, in
``commands``; the ones that look at caches and runs in ``browse``).
"""

from __future__ import annotations

import click

from featcache._version import __version__
from featcache.errors import FeatcacheError


class UserError(click.ClickException):
    exit_code = 2


class FeatcacheGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except FeatcacheError as exc:
            error = UserError(str(exc))
            error.exit_code = getattr(exc, "exit_code", UserError.exit_code)
            raise error from None


@click.group(cls=FeatcacheGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="featcache")
def cli():
    """Extract every layer of frozen CNN backbones once, then fuse and compare heads fast.

    \b
    featcache datasets                       list dataset sources, their splits and labels
    featcache backbones                      list backbones, taps and aliases
    featcache choose --backbone 'resnet*'    which model, taps and head? one answer, how sure, at what cost
    featcache rank --backbone 'resnet*'      every tap of many backbones, scored
    featcache extract --backbone resnet50    cache every tap of a frozen backbone
    featcache info CACHE.h5                  show what a cache file holds
    featcache cache list                     every cache, its size and the runs that use it (prune: remove)
    featcache sweep --combos pairs           every tap and pair x every head, at once
    featcache similarity --backbone resnet18 how much two taps say the same thing (linear CKA)
    featcache fuse-train --taps late --head logreg,mlp    fuse cached taps, train heads
    featcache finetune --unfreeze last-block   train unfrozen variants end to end
    featcache runs                           compare every run
    featcache predict --run RUN IMAGE...     classify new images with a run
    featcache report -o reports/study.html   one HTML page comparing every run
    featcache run pipelines/quickstart.toml  a whole study, stage by stage
    """
