"""``bg.distributed``: the library on ``torch.distributed`` process groups.

One convention everywhere: a ``process_group`` argument is ``None`` (default: the default
group when ``torch.distributed`` is initialized with more than one rank, else no reduction),
a ``torch.distributed.ProcessGroup``, or ``"local"`` (no reduction: each rank holds the whole
data set and computes alone).

With a group, every rank's data is its shard of one data set: the data-set operators
(``bg.linops``), their factors and counts are summed over the ranks (sample counts
all-reduced, so uneven shards are exact) and every rank holds the same result, equal (to
round-off) to one process over the whole data set. :func:`all_reduce_result` does the same
for :func:`beyondgrad.compute` results. :mod:`.checkpoint` saves and loads models, optimizers
and the Cockpit through ``torch.distributed.checkpoint`` (resumable on another world size).
What cannot be reduced exactly raises instead of
returning a rank-local answer (pruning, the merging curvatures, the Cockpit and the PINN
optimizers refuse under a group with several ranks; :func:`rank_local` makes such a call
explicitly rank-local). See ``docs/distributed.md``.
"""

from . import checkpoint, fsdp
from .group import LOCAL, rank_local, resolve_group
from .results import all_reduce_result

__all__ = ["LOCAL", "all_reduce_result", "checkpoint", "fsdp", "rank_local", "resolve_group"]
