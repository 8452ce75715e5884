"""Scratch buffers reused across rounds (``beyondgrad.buffers``) and the convolution unfold that
writes into them: the same memory from round to round, the same values as without a pool, and
nothing pooled that autograd would record."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from beyondgrad.buffers import BufferPool, contiguous, pooled
from beyondgrad.conv import unfold


def test_pool_reuses_tensors_round_by_round_and_drops_unrequested_ones():
    pool = BufferPool()
    a = pool.empty((3, 4), torch.float32, torch.device("cpu"))
    b = pool.empty((3, 4), torch.float32, torch.device("cpu"))
    assert a.data_ptr() != b.data_ptr()  # two requests of one round: two tensors
    pool.new_round()
    again = [pool.empty((3, 4), torch.float32, torch.device("cpu")) for _ in range(2)]
    assert {t.data_ptr() for t in again} == {a.data_ptr(), b.data_ptr()}
    other = pool.empty((3, 4), torch.float64, torch.device("cpu"))
    assert other.dtype == torch.float64 and other.data_ptr() not in {a.data_ptr(), b.data_ptr()}
    assert pool.nbytes == 2 * 12 * 4 + 12 * 8
    pool.new_round()
    pool.empty((5,), torch.float32, torch.device("cpu"))
    pool.new_round()  # the (3, 4) tensors went unrequested for a whole round: dropped
    assert pool.nbytes == 5 * 4


def test_contiguous_pools_only_copies_outside_autograd():
    x = torch.randn(2, 3, 4).permute(2, 0, 1)
    assert contiguous(x).is_contiguous() and torch.equal(contiguous(x), x)  # no pool: plain
    pool = BufferPool()
    with pooled(pool):
        first = contiguous(x)
        assert torch.equal(first, x) and pool.nbytes == x.numel() * x.element_size()
        ready = torch.randn(5)
        assert contiguous(ready) is ready  # already contiguous: no copy
        w = torch.randn(2, 3, 4, requires_grad=True)
        y = contiguous(w.permute(2, 0, 1))
        assert (
            y.requires_grad and pool.nbytes == x.numel() * x.element_size()
        )  # recorded copy: not pooled
        y.sum().backward()
        assert torch.equal(w.grad, torch.ones_like(w))
    pool.new_round()
    with pooled(pool):
        second = contiguous(x * 2)
    assert second.data_ptr() == first.data_ptr() and torch.equal(second, 2 * x)
    assert contiguous(x).data_ptr() != first.data_ptr()  # outside the block: no pool


def test_unfold_in_a_pool_equals_torch_and_reuses_its_columns():
    x = torch.randn(3, 2, 7, 6, dtype=torch.float64)
    pool = BufferPool()
    with pooled(pool):
        cols = unfold(x, 3, dilation=1, padding=1, stride=2)
    torch.testing.assert_close(cols, F.unfold(x, 3, dilation=1, padding=1, stride=2))
    pool.new_round()
    with pooled(pool):
        again = unfold(2 * x, 3, dilation=1, padding=1, stride=2)
    assert again.data_ptr() == cols.data_ptr()
    torch.testing.assert_close(again, F.unfold(2 * x, 3, dilation=1, padding=1, stride=2))


def test_sum_of_squares_row_by_row_equals_the_plain_reduction():
    from beyondgrad.forms.base import ROW_BY_ROW_MIN, sum_of_squares

    rows = torch.randn(5, 2, ROW_BY_ROW_MIN, dtype=torch.float64)  # long rows: row by row
    torch.testing.assert_close(sum_of_squares(rows), rows.pow(2).sum(0), rtol=1e-14, atol=0)
    short = torch.randn(5, 7, dtype=torch.float64)
    torch.testing.assert_close(sum_of_squares(short), short.pow(2).sum(0), rtol=1e-14, atol=0)
    tracked = rows.clone().requires_grad_()
    sum_of_squares(tracked).sum().backward()  # under autograd: differentiable
    torch.testing.assert_close(tracked.grad, 2 * rows)
