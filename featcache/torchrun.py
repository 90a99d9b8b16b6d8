"""Work split across the processes ``torchrun`` starts: who this process is, and how the ranks agree.

Flow: extract (one contiguous shard of rows per rank: :mod:`featcache.extraction.distributed`), sweep (a share of
the combinations per rank) and rank (a share of the models) -> **torchrun**. ``torchrun --nproc-per-node N -m
featcache ...`` (and across machines with ``--nnodes``, or one ``srun`` task per rank) starts N processes with
``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` set; the folders they write must be visible to every rank (one
machine, or shared storage). A gloo process group carries only barriers and small decisions; results travel
through files: each rank appends its own rows file (:func:`rows_file`), which a killed rank resumes from, and
rank 0 folds them into the one file a single process writes.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from dataclasses import dataclass
from pathlib import Path

from featcache.device import resolve_device
from featcache.errors import FeatcacheError

TIMEOUT = datetime.timedelta(hours=12)  # ranks wait at barriers while the others work

_ALONE = False  # set by alone(): work inside one rank's share is a single process's


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def current() -> Ranks:
    """This process's place in a torchrun job (a single process, or work inside :func:`alone`, is rank 0 of 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or _ALONE:
        return Ranks()
    return Ranks(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")))


@contextlib.contextmanager
def alone():
    """Within it, :func:`current` is a single process: a rank's own share of the work (a ranking's models, each
    extracted whole by the rank that scores it) is not split again."""
    global _ALONE
    before, _ALONE = _ALONE, True
    try:
        yield
    finally:
        _ALONE = before


def init(r: Ranks) -> None:
    """Join the torchrun job's process group (gloo: barriers and small decisions only)."""
    import torch.distributed as dist

    if r.world > 1 and not dist.is_initialized():
        dist.init_process_group("gloo", timeout=TIMEOUT)
        # Leave the group before the interpreter exits: a live gloo group torn down by static
        # destructors can abort a finished rank ("terminate called without an active exception").
        atexit.register(_leave)


def _leave() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(r: Ranks) -> None:
    if r.world > 1:
        import torch.distributed as dist

        dist.barrier()


def agree(r: Ranks, value):
    """Rank 0's value, on every rank."""
    if r.world <= 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(r: Ranks, value) -> list:
    """Every rank's ``value``, in rank order, on every rank."""
    if r.world <= 1:
        return [value]
    import torch.distributed as dist

    values = [None] * r.world
    dist.all_gather_object(values, value)
    return values


def total(r: Ranks, value: int) -> int:
    """The sum of ``value`` over every rank (also a barrier)."""
    return sum(gather(r, value))


def together(r: Ranks, check):
    """``check()`` on every rank; where it fails on any (a cache missing on one machine's storage), every rank fails
    with that rank's one line, so none waits for the others at the next barrier."""
    try:
        value, error = check(), None
    except FeatcacheError as exc:
        value, error = None, str(exc)
    errors = gather(r, error)
    failed = [(k, e) for k, e in enumerate(errors) if e is not None]
    if failed:
        k, message = failed[0]
        alike = len(failed) == r.world and len(set(errors)) == 1  # the request's own problem, on every rank
        raise FeatcacheError(message if alike else f"rank {k} of {r.world}: {message}")
    return value


def same(r: Ranks, value: str, what: str) -> None:
    """Refuse, on every rank, a job whose ranks were started with different requests (``value``: what a request's
    result is named by, such as its folder's name)."""
    values = gather(r, value)
    for k, other in enumerate(values):
        if other != values[0]:
            raise FeatcacheError(f"the ranks disagree on the {what}: rank 0 has {values[0]}, rank {k} {other}; start "
                                 f"every rank with the same command, flags and caches")


def device_for(r: Ranks, requested: str):
    """cuda:LOCAL_RANK where a GPU is wanted and present, else the CPU."""
    import torch

    device = resolve_device(requested)
    if r.world > 1 and device.type == "cuda":
        torch.cuda.set_device(r.local_rank)
        return torch.device("cuda", r.local_rank)
    return device


def share(items: list, r: Ranks) -> list:
    """This rank's items of ``items``: every ``world``-th, from its own rank on (round robin, so that a list
    ordered by cost spreads it evenly)."""
    return items[r.rank::r.world]


def rows_file(folder: Path, r: Ranks, name: str = "rows.jsonl") -> Path:
    """Where a rank appends its rows: the folder's own rows file for a single process, else a file of its own."""
    path = Path(folder) / name
    return path if r.world <= 1 else path.with_name(f"{path.stem}.rank{r.rank}of{r.world}{path.suffix}")


def rank_files(folder: Path, name: str = "rows.jsonl") -> list[Path]:
    """The rank rows files a torchrun job left in ``folder`` (of any world size: one killed and started again with
    another is read too), in a fixed order."""
    path = Path(folder) / name
    # regular files only: a link planted in a shared folder (to /dev/zero, to a file elsewhere) is not read
    return sorted(p for p in Path(folder).glob(f"{path.stem}.rank*of*{path.suffix}")
                  if p.is_file() and not p.is_symlink())


def fold(folder: Path, lines_of, order: dict, name: str = "rows.jsonl") -> int:
    """Fold the rank rows files of a torchrun job into the folder's own rows file, then remove them; returns the rows
    added. ``lines_of(path)``: a file's good rows as (key, line); those a rank wrote go after the file's own in
    ``order`` (key -> position; others last, as found), each line once: a fold killed between writing the file
    and removing the rank files adds nothing the next time."""
    files = rank_files(folder, name)
    if not files:
        return 0
    from featcache.files import atomic_write

    main = Path(folder) / name
    present = [line for _, line in lines_of(main)]
    new: dict[str, str] = {}  # line -> key
    for path in files:
        for key, line in lines_of(path):
            new.setdefault(line, key)
    there = set(present)
    added = sorted((line for line in new if line not in there), key=lambda line: order.get(new[line], len(order)))
    if added:
        atomic_write(main, "".join(line + "\n" for line in [*present, *added]))
    for path in files:
        path.unlink(missing_ok=True)
    return len(added)


def on_main(r: Ranks, work):
    """``work()`` on rank 0 while the others wait: each returns its result on rank 0 and None elsewhere; where it fails
    with a user's error, every rank fails with its one line (the others would otherwise go on to read what it did not
    write)."""
    if r.world <= 1:
        return work()
    if r.main:
        try:
            value = work()
        except FeatcacheError as exc:
            agree(r, str(exc))
            raise
        except BaseException:
            agree(r, "rank 0 failed: its error is above")
            raise
        agree(r, None)
        return value
    message = agree(r, None)
    if message is not None:
        raise FeatcacheError(message)
    return None
