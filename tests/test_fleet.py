"""copytune.sync: rank 0's tuned table reaches every other rank's cache and in-memory table (gloo on CPU)."""

import json
import subprocess
import sys
import textwrap

import pytest

RANK = textwrap.dedent("""
    import json, sys, torch, torch.distributed as dist
    import copytune
    from copytune import CopyPlan, Dispatcher, get_strategy
    rank, world, init, cache = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    pool = {n: get_strategy(n) for n in ("torch_per_copy", "torch_foreach")}
    d = Dispatcher(cache, pool=pool, tune=(rank == 0))
    pairs = [(torch.arange(100, dtype=torch.int32), torch.zeros(100, dtype=torch.int32)),
             (torch.ones(8, 9), torch.zeros(8, 16)[:, :9])]
    plan = CopyPlan.from_pairs(pairs)
    if rank == 0:
        d.copy(pairs)  # tunes and stores this signature
    took = copytune.sync(dispatcher=d)
    choice = d.choose(plan)
    dist.barrier()
    print(json.dumps({"rank": rank, "took": took, "origin": choice.origin, "winner": choice.strategy,
                      "rows": sorted(r["key"] for r in d.store.rows())}))
    dist.destroy_process_group()
""")


@pytest.mark.parametrize("world", [2, 4])
def test_sync_over_gloo(tmp_path, world):
    init = f"file://{tmp_path}/rendezvous"
    procs = [subprocess.Popen([sys.executable, "-c", RANK, str(r), str(world), init, str(tmp_path / f"r{r}.db")],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    outs = [p.communicate(timeout=300) for p in procs]
    results = []
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    print(results)
    leader = results[0]
    assert leader["origin"] == "tuned" and len(leader["rows"]) == 1
    for r in results[1:]:
        assert r["took"] == 1 and r["rows"] == leader["rows"]
        assert r["origin"] == "cache" and r["winner"] == leader["winner"]  # adopted, not tuned (tune=False)


def test_sync_needs_a_process_group():
    import copytune

    with pytest.raises(RuntimeError, match="initialized torch.distributed"):
        copytune.sync()
