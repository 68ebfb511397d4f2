"""Token windows: contiguous rows, per-epoch reshuffle of shards and windows, exact state, ranks partitioning the batch."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from training.data import BatchLoader, DataError, Prefetcher, TokenStream, resolve_shards
from training.token_shards import write_token_shard


@pytest.fixture()
def counting_shards(tmp_path):
    """Three shards holding 0..999 in order, so every read shows exactly where it came from."""
    paths = []
    for i, (lo, hi) in enumerate([(0, 300), (300, 700), (700, 1000)]):
        path = tmp_path / f"shard_{i:05d}.tok"
        write_token_shard(path, np.arange(lo, hi), vocab_size=1000, eot_id=999)
        paths.append(path)
    return paths


def test_windows_are_contiguous_and_targets_shifted(counting_shards) -> None:
    loader = BatchLoader(TokenStream(counting_shards, seed=0, vocab_size=1000, shuffle=False), batch_size=2, seq_len=5)
    x, y = loader.next_batch()
    assert x.tolist() == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    assert y.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    assert loader.next_batch()[0][0, 0].item() == 10  # advanced by B*T, no token skipped


def test_epochs_reshuffle_shards_and_windows_from_the_seed(counting_shards) -> None:
    stream = TokenStream(counting_shards, seed=3, vocab_size=1000)
    orders = [tuple(stream.order(e)) for e in range(6)]
    assert len(set(orders)) > 1
    assert orders == [tuple(TokenStream(counting_shards, seed=3, vocab_size=1000).order(e)) for e in range(6)]
    per_epoch = 29 + 39 + 29  # (tokens - 1) // seq_len windows in each shard
    rows = stream.read_rows(3 * per_epoch, seq_len=10)  # three whole epochs, crossing shard boundaries
    assert (np.diff(rows, axis=1) == 1).all()  # every window is contiguous tokens of one shard
    epochs = [rows[e * per_epoch : (e + 1) * per_epoch, 0].tolist() for e in range(3)]
    for starts in epochs:  # each epoch visits every window once, in a shuffled order
        assert sorted(starts) == sorted([*range(0, 290, 10), *range(300, 690, 10), *range(700, 990, 10)])
        assert starts != sorted(starts)
    assert len({tuple(e) for e in epochs}) == 3


def test_too_short_shards_are_a_clear_error(counting_shards) -> None:
    with pytest.raises(DataError, match=r"train_data: the shards hold 1,000 tokens in all, not one window of seq_len\+1=401"):
        TokenStream(counting_shards, seed=0, vocab_size=1000).read_rows(1, seq_len=400)


def test_state_resumes_exactly(counting_shards) -> None:
    a = BatchLoader(TokenStream(counting_shards, seed=1, vocab_size=1000), 3, 7)
    for _ in range(40):
        a.next_batch()
    state = a.state_dict()
    expected = [a.next_batch()[0] for _ in range(60)]
    b = BatchLoader(TokenStream(counting_shards, seed=1, vocab_size=1000), 3, 7)
    b.load_state_dict(state)
    assert all(torch.equal(e, b.next_batch()[0]) for e in expected)


def test_prefetcher_state_is_that_of_the_consumed_batch(counting_shards) -> None:
    plain = BatchLoader(TokenStream(counting_shards, seed=1, vocab_size=1000), 2, 8)
    fetched = Prefetcher(BatchLoader(TokenStream(counting_shards, seed=1, vocab_size=1000), 2, 8), depth=3)
    for _ in range(5):
        assert torch.equal(plain.next_batch()[0], fetched.next_batch()[0])
        assert fetched.state_dict() == plain.state_dict()
    fetched.close()



def test_prefetcher_close_waits_for_its_thread(counting_shards) -> None:
    """A prefetch thread left inside a torch call at interpreter exit aborts the process (exit -6
    after a good run, seen under load in a 2-rank run): close() returns only once it has ended."""
    class SlowLoader(BatchLoader):
        def next_batch(self):
            time.sleep(0.3)  # the thread is inside a read when close() is called
            return super().next_batch()

    fetched = Prefetcher(SlowLoader(TokenStream(counting_shards, seed=1, vocab_size=1000), 2, 8), depth=2)
    fetched.next_batch()
    fetched.close()
    assert not fetched._thread.is_alive()

def test_ranks_split_the_single_process_batch(counting_shards) -> None:
    single = BatchLoader(TokenStream(counting_shards, seed=2, vocab_size=1000), batch_size=4, seq_len=6)
    ranks = [BatchLoader(TokenStream(counting_shards, seed=2, vocab_size=1000), 2, 6, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(10):
        x, y = single.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    assert ranks[0].state_dict() == single.state_dict()


def test_paths_globs_lists_and_errors(counting_shards, tmp_path) -> None:
    assert resolve_shards(str(tmp_path)) == [p.resolve() for p in counting_shards]
    assert resolve_shards(str(tmp_path / "shard_0000[01].tok")) == [p.resolve() for p in counting_shards[:2]]
    assert len(resolve_shards([str(counting_shards[0]), str(tmp_path)])) == 3
    with pytest.raises(DataError, match="val_data: .*nope does not exist"):
        resolve_shards(str(tmp_path / "nope"), "val_data")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="train_data: no token shards"):
        resolve_shards(str(tmp_path / "empty"))
    with pytest.raises(DataError, match="vocabulary of 1000, larger than model.vocab_size=500"):
        TokenStream(counting_shards, seed=0, vocab_size=500)
