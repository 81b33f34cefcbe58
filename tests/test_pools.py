"""The threshold pools (spec §2): one random patch per crop of a shuffled pass, on one process
or under torchrun (hpseg.training.pools)."""

import pytest
import torch
import torch.nn.functional as F

from hpseg.method import fill_pool, picked_patches
from hpseg.runtime import DistributedContext
from hpseg.training import pools as pools_module
from hpseg.training.distributed import share_bounds
from hpseg.training.pools import collect_pool, pool_batches


def test_picked_patches_hand_computed():
    maps = torch.arange(2 * 3 * 2 * 2, dtype=torch.float32).reshape(2, 3, 2, 2)  # (B, C, h, w)
    picked = picked_patches(maps, torch.tensor([3, 1]))
    # image 0, patch 3 (row 1, column 1): channels 3, 7, 11; image 1, patch 1: 13, 17, 21
    assert picked.tolist() == [[3.0, 7.0, 11.0], [13.0, 17.0, 21.0]]


def test_collect_pool_picks_one_patch_per_crop_with_the_generator():
    maps = [torch.randn(4, 3, 2, 2) * 5 for _ in range(3)]
    pool = collect_pool(iter(maps), [4, 4, 4], pool_size=10, generator=torch.Generator().manual_seed(0))
    assert pool.shape == (10, 3)
    # The same generator's draws, one per crop of each batch, picked and normalised by hand.
    generator = torch.Generator().manual_seed(0)
    expected = []
    for batch in maps:
        picks = torch.randint(4, (4,), generator=generator)
        expected += [F.normalize(batch[b].flatten(1)[:, picks[b]], dim=0) for b in range(4)]
    torch.testing.assert_close(pool, torch.stack(expected[:10]))


def test_collect_pool_stops_reading_when_full():
    def batches():
        yield torch.randn(4, 3, 2, 2)
        raise AssertionError("pool was full: the pass must stop")

    assert collect_pool(batches(), [4, 4], pool_size=4, generator=torch.Generator()).shape == (4, 3)


def test_collect_pool_of_no_crops_is_an_error():
    with pytest.raises(ValueError, match="empty dataset"):
        collect_pool(iter([]), [], pool_size=4, generator=torch.Generator())


def test_rank_shares_pick_what_one_process_picks(monkeypatch):
    """Under torchrun each rank holds a share of every batch: with the same generator it picks the
    patches one process picks for those crops (gathering, a collective, is stood in for)."""
    batches = [torch.randn(5, 3, 2, 3) for _ in range(2)]
    whole = collect_pool(iter(batches), [5, 5], 10, torch.Generator().manual_seed(4))
    monkeypatch.setattr(pools_module, "gather_uneven", lambda rows, sizes, context: rows)  # this rank's rows only
    for rank in range(2):
        own = [share_bounds(5, rank, 2) for _ in batches]
        shares = [batch[bounds] for batch, bounds in zip(batches, own)]
        pool = collect_pool(iter(shares), [5, 5], 10, torch.Generator().manual_seed(4), DistributedContext(rank, 2))
        rows = torch.cat([whole[k * 5 : (k + 1) * 5][bounds] for k, bounds in enumerate(own)])
        torch.testing.assert_close(pool, rows)


def test_pool_batches_read_only_the_crops_the_pool_needs():
    batches = pool_batches(n_crops=50, batch_size=8, pool_size=20, generator=torch.Generator().manual_seed(0))
    assert [len(b) for b in batches] == [8, 8, 8]  # 24 >= 20 crops: one batch more would be read for nothing
    assert len({i for b in batches for i in b}) == 24
    short = pool_batches(n_crops=9, batch_size=4, pool_size=100, generator=torch.Generator(), world_size=2)
    assert [len(b) for b in short] == [4, 4]  # a tail of one crop cannot be split over two ranks


def test_fill_pool_truncates_and_normalises():
    pool = fill_pool([torch.tensor([[3.0, 4.0]]), torch.tensor([[0.0, 2.0], [1.0, 0.0]])], pool_size=2)
    torch.testing.assert_close(pool, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
