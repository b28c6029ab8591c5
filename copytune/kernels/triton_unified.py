"""``triton_unified``: one launch, 2-D grid (tile, copy); each program copies one tile of one copy.

Beyond the published fused kernel: 2-D strided sources and destinations are copied in-kernel, any dtype as raw
units, any number of copies (chunks of SLOTS), and descriptors travel as scalar arguments, so there is no
per-call host-to-device pointer table. Tiles go on grid axis 0 (up to 2³¹−1 programs) and copies on axis 1,
because axis 1 is limited to 65535 programs and a 256 MiB copy has more tiles than that.
"""

from __future__ import annotations

import triton
import triton.language as tl

from copytune.kernels.triton_tile import FIELDS, SLOTS, TritonStrategy, copy_tile, pick8, slot_fields

_ARGS = [f"{f}{i}" for i in range(SLOTS) for f in ("s", "d", "n", "c", "ss", "ds")]


@triton.jit(do_not_specialize=_ARGS)
def _unified_kernel(
    s0: tl.int64, d0: tl.int64, n0: tl.int64, c0: tl.int64, ss0: tl.int64, ds0: tl.int64,
    s1: tl.int64, d1: tl.int64, n1: tl.int64, c1: tl.int64, ss1: tl.int64, ds1: tl.int64,
    s2: tl.int64, d2: tl.int64, n2: tl.int64, c2: tl.int64, ss2: tl.int64, ds2: tl.int64,
    s3: tl.int64, d3: tl.int64, n3: tl.int64, c3: tl.int64, ss3: tl.int64, ds3: tl.int64,
    s4: tl.int64, d4: tl.int64, n4: tl.int64, c4: tl.int64, ss4: tl.int64, ds4: tl.int64,
    s5: tl.int64, d5: tl.int64, n5: tl.int64, c5: tl.int64, ss5: tl.int64, ds5: tl.int64,
    s6: tl.int64, d6: tl.int64, n6: tl.int64, c6: tl.int64, ss6: tl.int64, ds6: tl.int64,
    s7: tl.int64, d7: tl.int64, n7: tl.int64, c7: tl.int64, ss7: tl.int64, ds7: tl.int64,
    UNIT: tl.constexpr, BLOCK: tl.constexpr,
):
    c = tl.program_id(1)
    n = pick8(c, n0, n1, n2, n3, n4, n5, n6, n7)
    start = tl.program_id(0).to(tl.int64) * BLOCK
    if start < n:  # programs past a short copy's last tile exit at once
        copy_tile(
            pick8(c, s0, s1, s2, s3, s4, s5, s6, s7),
            pick8(c, d0, d1, d2, d3, d4, d5, d6, d7),
            n,
            pick8(c, c0, c1, c2, c3, c4, c5, c6, c7),
            pick8(c, ss0, ss1, ss2, ss3, ss4, ss5, ss6, ss7),
            pick8(c, ds0, ds1, ds2, ds3, ds4, ds5, ds6, ds7),
            start, UNIT, BLOCK,
        )


class TritonUnified(TritonStrategy):
    name = "triton_unified"
    kernel = _unified_kernel
    defaults = {"block": 1024, "num_warps": 4}
    search = [{"block": 256, "num_warps": 2}, {"block": 2048, "num_warps": 4}, {"block": 4096, "num_warps": 8}]

    def layout(self, descs, unit, params, device):
        args = [0] * (SLOTS * FIELDS)
        tiles = 0
        for slot, d in enumerate(descs):
            fields = slot_fields(d, unit)
            args[slot * FIELDS:(slot + 1) * FIELDS] = fields
            tiles = max(tiles, triton.cdiv(fields[2], params["block"]))
        return (tiles, len(descs)), args, [slot * FIELDS for slot in range(len(descs))]


STRATEGY = TritonUnified()
