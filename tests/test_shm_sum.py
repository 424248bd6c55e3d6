"""SharedMemorySum on two real processes: exact sums, identical on every rank, and a timeout."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dptrain.shm_sum import SharedMemorySum, supported

pytestmark = pytest.mark.skipif(not supported(), reason="shared-memory sums need x86-64")
LENGTHS = (1000, 7, 1000, 513) * 5  # both slot sets, full and partial lengths


def _values(rank: int, call: int, n: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(100 * call + rank))


def _rank(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    summer = SharedMemorySum(1000, rank, 2, timeout_s=2.0)
    sums = [summer.sum_(_values(rank, call, n)) for call, n in enumerate(LENGTHS)]
    results[rank] = torch.cat(sums)
    dist.barrier()
    if rank == 0:  # rank 1 never joins this call
        try:
            summer.sum_(torch.ones(10))
        except dist.DistError as e:
            results["timeout"] = str(e)
    dist.barrier()
    dist.destroy_process_group()


def _shm_files() -> set[str]:
    return {f for f in os.listdir("/dev/shm") if f.startswith("dptrain-grads-")}


def test_two_ranks_get_the_same_exact_sums(free_port):
    before = _shm_files()
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(free_port, results), nprocs=2)
        expected = torch.cat([_values(0, call, n) + _values(1, call, n)
                              for call, n in enumerate(LENGTHS)])
        assert torch.equal(results[0], expected)
        assert torch.equal(results[1], expected)  # the same bits on both ranks
        assert "timed out: rank 0 waited 2 s for rank(s) [1]" in results["timeout"]
    assert _shm_files() <= before  # the buffer has no name to leave behind
