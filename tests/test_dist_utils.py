import torch
import torch.distributed as dist

from tests.dist_utils import run_distributed


def _sum_of_ranks(rank: int, world_size: int) -> float:
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    return t.item()


def test_two_processes_all_reduce():
    # ranks contribute 1 and 2, so every rank sees 3
    assert run_distributed(_sum_of_ranks, 2) == [3.0, 3.0]
