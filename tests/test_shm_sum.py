"""SharedMemorySum on 2 and 3 real processes: exact sums in rank order, the same bits on every
rank, rounds of uneven sizes through both ways of adding, a bounded buffer, and a timeout."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dptrain.distributed.shm_sum import BUFFER_BYTES, SharedMemorySum, supported

pytestmark = pytest.mark.skipif(not supported(), reason="shared-memory sums need x86-64")
# Rounds of 64 elements: 1000 = 15 rounds + 40, 513 = 8 rounds + 1, 100 = 64 + 36. With 3 ranks a round of 48
# or more is reduce-scattered (uneven shares: 64 = 16 + 16 + 32 elements in whole cache lines),
# a shorter one added by every rank: both ways, in both slot sets, with full and partial lengths.
ROUND, ALL_READ_BELOW = 64, 48
LENGTHS = (1000, 7, 1000, 513, 100, 64, 48, 47) * 3


def _values(rank: int, call: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(100 * call + rank))


def _rank(rank: int, world_size: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    summer = SharedMemorySum(1000, rank, world_size, timeout_s=1.0, round_elements=ROUND,
                             all_read_below=ALL_READ_BELOW)
    sums, kept = [], []
    for call, n in enumerate(LENGTHS):
        values = _values(rank, call, n)
        sums.append(summer.sum_(values.clone()))
        if summer.keeps_inputs(n):  # what the noise scale reads after the sum
            kept.append(torch.equal(torch.cat(summer.own_inputs(n)), values))
    results[rank] = torch.cat(sums)
    results[f"kept{rank}"] = kept
    # A 20M-parameter model (the study's widest) maps no more than BUFFER_BYTES.
    results[f"map{rank}"] = len(SharedMemorySum(20_000_000, rank, world_size, 1.0)._map)
    dist.barrier()
    if rank == 0:  # the other ranks never join this call
        try:
            summer.sum_(torch.ones(10))
        except dist.DistError as e:
            results["timeout"] = str(e)
    dist.barrier()
    dist.destroy_process_group()


def _shm_files() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("dptrain-grads-")}


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_get_the_same_exact_sums(free_port, world_size):
    before = _shm_files()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(world_size, free_port, results), nprocs=world_size)
        expected = []
        for call, n in enumerate(LENGTHS):
            total = _values(0, call, n)
            for rank in range(1, world_size):  # in rank order, as every rank must add
                total = total + _values(rank, call, n)
            expected.append(total)
        expected = torch.cat(expected)
        for rank in range(world_size):
            assert torch.equal(results[rank], expected), rank  # the same bits on every rank
            assert results[f"map{rank}"] <= BUFFER_BYTES + 4096
            # this rank's own inputs, intact after sums of one and two rounds (7 to 100)
            assert results[f"kept{rank}"] == [True] * 15, rank
        late = list(range(1, world_size))
        assert f"timed out: rank 0 waited 1 s for rank(s) {late}" in results["timeout"]
    assert _shm_files() <= before  # the buffer has no name to leave behind


def test_each_rank_reduces_its_share_in_whole_cache_lines():
    summers = [SharedMemorySum.__new__(SharedMemorySum) for _ in range(3)]
    for rank, summer in enumerate(summers):
        summer.rank, summer.world_size = rank, 3
    for n in (64, 65, 1000, 16, 1):
        shares = [s.share(n) for s in summers]
        assert shares[0][0] == 0 and shares[-1][1] == n  # together they cover the round
        assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
        assert all(lo % 16 == 0 for lo, _ in shares)
    assert [s.share(64) for s in summers] == [(0, 16), (16, 32), (32, 64)]
