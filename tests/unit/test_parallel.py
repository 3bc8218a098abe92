"""Data-parallel draws (jdm/training/parallel.py): the processes' shards of a batch are the batch one
process draws from the same stream."""

import torch

from jdm.training.parallel import Shard, average_gradients


def draws(shard, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [shard.draw(lambda m: torch.randint(1000, (m,), generator=g), n),
            shard.draw(lambda m: torch.randn((m, 2, 3), generator=g), n)]


def test_two_shards_are_the_halves_of_what_one_process_draws():
    whole = draws(Shard(), 8)
    halves = [draws(Shard(i, 2), 4) for i in (0, 1)]
    for k, one in enumerate(whole):
        assert torch.equal(torch.cat([halves[0][k], halves[1][k]]), one)
    assert not torch.equal(halves[0][1], halves[1][1])  # each process keeps its own rows


def test_one_process_draws_and_updates_as_before():
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(Shard().draw(lambda m: torch.randn(m, generator=g1), 5), torch.randn(5, generator=g2))
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    average_gradients([p], Shard())  # no process group: nothing to average, nothing touched
    assert torch.equal(p.grad, torch.full((3,), 2.0))
