"""Block-shuffled batches over ranges and index arrays, and the background prefetcher."""
import threading

import numpy as np
import pytest
import torch

from dagfm_ext.data import Prefetcher
from dagfm_ext.data.batches import block_rows, iter_batches


def data(n=1000, slots=3):
    x = np.arange(n * slots, dtype=np.int32).reshape(n, slots)
    return x, (np.arange(n) % 2).astype(np.float32)


@pytest.mark.parametrize("batch_size", [128, 100, 7])
def test_shuffled_batches_cover_the_split_once_in_whole_blocks(batch_size):
    x, y = data()
    rows = range(150, 1000)
    block = block_rows(batch_size)
    assert batch_size % block == 0 and block <= 64
    batches = list(iter_batches(x, y, rows, batch_size, np.random.default_rng(3)))
    seen = np.concatenate([b[0][:, 0].numpy() // 3 for b in batches])
    assert sorted(seen.tolist()) == list(rows)  # every row once
    assert [len(b[1]) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    for xb, yb in batches:
        r = xb[:, 0].numpy() // 3
        for s in range(0, len(r), block):  # runs of consecutive rows, each from a block boundary
            piece = r[s:s + block]
            assert (piece[0] - 150) % block == 0
            np.testing.assert_array_equal(piece, np.arange(piece[0], piece[0] + len(piece)))
        np.testing.assert_array_equal(yb.numpy(), y[r])
        assert xb.dtype == torch.int64 and yb.dtype == torch.float32
    again = list(iter_batches(x, y, rows, batch_size, np.random.default_rng(3)))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))  # keyed on the rng only
    assert not torch.equal(batches[0][0], next(iter_batches(x, y, rows, batch_size, np.random.default_rng(4)))[0])


def test_index_splits_shuffle_row_by_row():
    """In-memory data keeps the row-level shuffle: a permutation of the split, each batch sorted."""
    x, y = data()
    idx = np.arange(100, 900, 2)
    got = list(iter_batches(x, y, idx, 64, np.random.default_rng(7)))
    perm = np.random.default_rng(7).permutation(idx)
    for k, (xb, yb) in enumerate(got):
        want = np.sort(perm[64 * k:64 * (k + 1)])
        np.testing.assert_array_equal(xb[:, 0].numpy() // 3, want)
        np.testing.assert_array_equal(yb.numpy(), y[want])
    ordered = list(iter_batches(x, y, np.arange(0, 1000, 3), 50))
    np.testing.assert_array_equal(np.concatenate([b[0][:, 0].numpy() // 3 for b in ordered]), np.arange(0, 1000, 3))


def test_ranks_share_each_global_batch():
    x, y = data()
    full = list(iter_batches(x, y, range(0, 1000), 96, np.random.default_rng(1)))
    shares = [list(iter_batches(x, y, range(0, 1000), 96, np.random.default_rng(1), rank=r, world_size=3))
              for r in range(3)]
    for k, (xb, _) in enumerate(full):
        merged = torch.cat([shares[r][k][0] for r in range(3)])
        assert sorted(merged[:, 0].tolist()) == sorted(xb[:, 0].tolist())
    with pytest.raises(ValueError, match="rank: expected"):
        next(iter_batches(x, y, range(10), 4, rank=2, world_size=2))


def test_prefetcher_keeps_order_runs_ahead_and_forwards_errors():
    x, y = data()
    src = list(iter_batches(x, y, range(0, 1000), 64, np.random.default_rng(0)))
    threads = []

    def produce():
        for b in src:
            threads.append(threading.current_thread().name)
            yield b

    got = list(Prefetcher(produce(), depth=3))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, src)) and len(got) == len(src)
    assert set(threads) == {"dagfm-prefetch"}  # assembled off the training thread

    def failing():
        yield src[0]
        raise RuntimeError("disk gone")

    it = iter(Prefetcher(failing()))
    assert torch.equal(next(it)[0], src[0][0])
    with pytest.raises(RuntimeError, match="disk gone"):
        next(it)
    early = Prefetcher(iter(src), depth=1)
    next(iter(early))
    early.close()  # a consumer that stops early does not leave the thread blocked
    assert not early._thread.is_alive()
    with pytest.raises(ValueError, match="depth"):
        Prefetcher(iter(src), depth=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_prefetcher_pins_memory():
    x, y = data()
    xb, yb = next(iter(Prefetcher(iter_batches(x, y, range(0, 100), 10), pin=True)))
    assert xb.is_pinned() and yb.is_pinned()
