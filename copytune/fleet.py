"""Sharing tuned winners between the ranks of one job: one rank tunes, the others reuse its table.

Serving engines start one process per GPU of a node; without this each would tune the same keys itself.
Call ``copytune.sync()`` after the tuning rank has tuned (e.g. after ``copytune tune`` ran in rank 0, or after
warm-up) and before serving. The table travels as the same validated JSON bundle that ``copytune export``
writes: data only.
"""

from __future__ import annotations

import json

from copytune.cache.bundle import make_bundle, parse_bundle, plan_merge
from copytune.dispatch import Dispatcher, default_dispatcher


def sync(group=None, src: int = 0, dispatcher: Dispatcher | None = None) -> int:
    """Broadcast the tuned table of rank ``src`` over ``torch.distributed`` (any backend) and merge it into every
    other rank's cache and in-memory table (faster entry wins per key). Returns how many entries this rank took.

    All ranks of ``group`` must call it. ``dispatcher`` defaults to the process-wide eager one; its cache and
    in-memory table are the ones updated.
    """
    import torch.distributed as dist  # noqa: PLC0415

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("copytune.sync needs an initialized torch.distributed process group")
    d = dispatcher or default_dispatcher("eager")
    rank = dist.get_rank(group)
    payload = [json.dumps(make_bundle(d.store.rows())) if rank == src else None]
    dist.broadcast_object_list(payload, src=dist.get_global_rank(group, src) if group is not None else src,
                               group=group)
    if rank == src:
        return 0
    plan = plan_merge(d.store, parse_bundle(payload[0]))
    if plan.rows:
        d.store.put_many(plan.rows)  # a read-only or broken cache still gets the in-memory table below
    for row in plan.rows:
        d.adopt(row)
    return len(plan.rows)
