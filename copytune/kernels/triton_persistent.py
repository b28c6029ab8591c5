"""``triton_persistent``: a grid capped near ``programs_per_sm`` × SM count; each program walks a flattened
list of all copies' tiles with a stride of the grid size.

Better than the unified kernel when copies are very uneven (one 8 MiB page table beside six 256-byte vectors):
no programs are launched only to exit, and a large batch does not queue waves of tiny blocks.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from copytune.kernels.triton_tile import SLOTS, TritonStrategy, copy_tile, pick8, slot_fields

FIELDS = 7  # the shared six plus the copy's first tile in the flattened list
_ARGS = [f"{f}{i}" for i in range(SLOTS) for f in ("s", "d", "n", "c", "ss", "ds", "t")] + ["total"]


@triton.jit(do_not_specialize=_ARGS)
def _persistent_kernel(
    s0: tl.int64, d0: tl.int64, n0: tl.int64, c0: tl.int64, ss0: tl.int64, ds0: tl.int64, t0: tl.int64,
    s1: tl.int64, d1: tl.int64, n1: tl.int64, c1: tl.int64, ss1: tl.int64, ds1: tl.int64, t1: tl.int64,
    s2: tl.int64, d2: tl.int64, n2: tl.int64, c2: tl.int64, ss2: tl.int64, ds2: tl.int64, t2: tl.int64,
    s3: tl.int64, d3: tl.int64, n3: tl.int64, c3: tl.int64, ss3: tl.int64, ds3: tl.int64, t3: tl.int64,
    s4: tl.int64, d4: tl.int64, n4: tl.int64, c4: tl.int64, ss4: tl.int64, ds4: tl.int64, t4: tl.int64,
    s5: tl.int64, d5: tl.int64, n5: tl.int64, c5: tl.int64, ss5: tl.int64, ds5: tl.int64, t5: tl.int64,
    s6: tl.int64, d6: tl.int64, n6: tl.int64, c6: tl.int64, ss6: tl.int64, ds6: tl.int64, t6: tl.int64,
    s7: tl.int64, d7: tl.int64, n7: tl.int64, c7: tl.int64, ss7: tl.int64, ds7: tl.int64, t7: tl.int64,
    total: tl.int64,
    UNIT: tl.constexpr, BLOCK: tl.constexpr,
):
    for g in range(tl.program_id(0).to(tl.int64), total, tl.num_programs(0)):
        # unused slots carry t = total, so they never count
        c = ((g >= t1).to(tl.int32) + (g >= t2).to(tl.int32) + (g >= t3).to(tl.int32) + (g >= t4).to(tl.int32)
             + (g >= t5).to(tl.int32) + (g >= t6).to(tl.int32) + (g >= t7).to(tl.int32))
        start = (g - pick8(c, t0, t1, t2, t3, t4, t5, t6, t7)) * BLOCK
        copy_tile(
            pick8(c, s0, s1, s2, s3, s4, s5, s6, s7),
            pick8(c, d0, d1, d2, d3, d4, d5, d6, d7),
            pick8(c, n0, n1, n2, n3, n4, n5, n6, n7),
            pick8(c, c0, c1, c2, c3, c4, c5, c6, c7),
            pick8(c, ss0, ss1, ss2, ss3, ss4, ss5, ss6, ss7),
            pick8(c, ds0, ds1, ds2, ds3, ds4, ds5, ds6, ds7),
            start, UNIT, BLOCK,
        )


@functools.cache
def _processors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return os.cpu_count() or 1


class TritonPersistent(TritonStrategy):
    name = "triton_persistent"
    kernel = _persistent_kernel
    defaults = {"block": 1024, "num_warps": 4, "programs_per_sm": 4}
    search = [{"block": 2048, "num_warps": 8, "programs_per_sm": 2},
              {"block": 512, "num_warps": 4, "programs_per_sm": 8}]

    def layout(self, descs, unit, params, device):
        args = [0] * (SLOTS * FIELDS)
        total = 0
        for slot, d in enumerate(descs):
            fields = slot_fields(d, unit)
            args[slot * FIELDS:(slot + 1) * FIELDS] = (*fields, total)
            total += triton.cdiv(fields[2], params["block"])
        for slot in range(len(descs), SLOTS):
            args[slot * FIELDS + FIELDS - 1] = total
        args.append(total)
        programs = min(total, params["programs_per_sm"] * _processors(torch.device(device)))
        return (programs,), args, [slot * FIELDS for slot in range(len(descs))]


STRATEGY = TritonPersistent()
