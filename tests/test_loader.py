"""Device-resident batches: disjoint shards per process, reshuffled every epoch, replayable on resume."""
import torch

from app.loader import ShardedBatches


def _epoch(loader: ShardedBatches, epoch: int, skip: int = 0) -> list[int]:
    loader.set_epoch(epoch, skip)
    return [i for _, labels in loader for i in labels.tolist()]


def _loaders(n: int, world: int, **kw) -> list[ShardedBatches]:
    ids = torch.arange(n)
    return [ShardedBatches(ids.view(n, 1, 1, 1), ids, rank=r, world_size=world, **kw) for r in range(world)]


def test_training_shards_are_disjoint_equal_and_reshuffled_each_epoch() -> None:
    loaders = _loaders(101, 3, batch_size=12, shuffle=True, seed=5)
    seen = [_epoch(l, 1) for l in loaders]
    assert all(len(s) == 33 for s in seen) and all(len(l) == 9 for l in loaders)  # 4 per process per step
    assert len(set().union(*map(set, seen))) == 99  # disjoint; the permutation's last 2 images skipped
    assert [_epoch(l, 2) for l in loaders] != seen
    assert [_epoch(l, 1) for l in loaders] == seen  # (seed, epoch) decides the order


def test_resume_mid_epoch_skips_exactly_the_batches_already_trained() -> None:
    (loader,) = _loaders(50, 1, batch_size=8, shuffle=True, seed=1)
    full = _epoch(loader, 4)
    assert _epoch(loader, 4, skip=3) == full[24:]
    assert _epoch(loader, 4) == full  # the skip applies once


def test_evaluation_shards_cover_every_image_exactly_once() -> None:
    loaders = _loaders(51, 2, batch_size=10, shuffle=False, drop_uneven=False)
    seen = [_epoch(l, 1) for l in loaders]
    assert sorted(seen[0] + seen[1]) == list(range(51)) and (len(seen[0]), len(seen[1])) == (26, 25)
