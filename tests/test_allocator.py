"""``bg.retain_freed_memory``: freed CPU blocks stay mapped for the next call (glibc).

The setting is process-wide, so the behaviour is checked in fresh interpreters: the same large
tensors allocated, written and freed together repeatedly are faulted in again every round with
the smallest thresholds (glibc's own defaults are dynamic, so a round may or may not be
trimmed), and are kept (no page faults after the first rounds) with the function's defaults.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest
import torch
from torch import nn

import beyondgrad as bg

SCRIPT = r"""
import resource, sys, torch
import beyondgrad as bg
torch.set_num_threads(1)
if sys.argv[1] == "retain":  # the defaults: keep up to 1 GiB of free heap top
    assert bg.retain_freed_memory()
elif sys.argv[1] == "retain-large":  # no block in a mapping of its own
    assert bg.retain_freed_memory(large_blocks=False)
else:  # the smallest thresholds: every block of 1 MiB or more is returned when freed
    assert bg.retain_freed_memory(trim_threshold_mib=1, mmap_threshold_mib=1)

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def round_trip():  # three blocks freed together (8 MiB each: 24 MiB of free heap top at once)
    blocks = [torch.empty(int(sys.argv[2]) << 18) for _ in range(3)]
    for t in blocks:
        t.fill_(1.0)
    del blocks, t


for _ in range(3):
    round_trip()
start = faults()
for _ in range(10):
    round_trip()
print((faults() - start) / 10)
"""

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"


def _faults_per_round(mode: str, mib: int = 8) -> float:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode, str(mib)], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_retained_blocks_are_not_faulted_in_again():
    pages = 3 * (8 << 20) // 4096
    released, retained = _faults_per_round("release"), _faults_per_round("retain")
    assert released > 0.9 * pages  # returned when freed: faulted in again every round
    assert retained < pages / 16  # kept: later rounds reuse the mapped pages


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_blocks_above_the_mmap_limit_are_kept_only_without_large_blocks():
    pages = 3 * (40 << 20) // 4096  # 40 MiB each: above glibc's 32 MiB limit of the threshold
    mapped, kept = _faults_per_round("retain", 40), _faults_per_round("retain-large", 40)
    assert mapped > 0.9 * pages  # each block its own mapping, unmapped when freed
    assert kept < pages / 16


@pytest.mark.parametrize(
    "kwargs", [{"trim_threshold_mib": 0}, {"trim_threshold_mib": 4096}, {"mmap_threshold_mib": 64}]
)
def test_thresholds_out_of_range_raise(kwargs):
    with pytest.raises(ValueError, match="threshold_mib must be in"):
        bg.retain_freed_memory(**kwargs)


# --- huge pages: large tensors beyondgrad allocates are advised before their first write ---


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping that holds ``address`` (Linux ``/proc/self/smaps``)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return set(line.split()[1:])
    raise LookupError(f"no mapping holds {address:#x}")


@pytest.fixture
def huge_threshold():
    """Restores the process-wide threshold after a test changes it."""
    before = bg.allocator.huge_page_threshold()
    yield
    bg.allocator._huge_page_bytes = before


HUGE = pytest.mark.skipif(
    not bg.allocator.huge_pages_available(), reason="no transparent huge pages on this system"
)


@HUGE
def test_a_large_tensor_is_advised_and_a_small_one_is_not(huge_threshold):
    assert bg.use_huge_pages(16)
    big = bg.allocator.empty(((24 << 20) // 4,), like=torch.zeros(1, dtype=torch.float32))
    assert big.dtype == torch.float32 and big.shape == ((24 << 20) // 4,)
    interior = -(-big.data_ptr() // bg.allocator.HUGE_PAGE_BYTES) * bg.allocator.HUGE_PAGE_BYTES
    assert "hg" in _vm_flags(interior + 4096)
    small = torch.empty((8 << 20) // 4, dtype=torch.float32)  # below the threshold: not advised
    assert not bg.allocator.advise_huge_pages(small)
    assert bg.allocator.advise_huge_pages(big)


@HUGE
def test_switched_off_nothing_is_advised(huge_threshold):
    assert bg.use_huge_pages(None)
    assert bg.allocator.huge_page_threshold() is None
    big = bg.allocator.empty(((64 << 20) // 8,), like=torch.zeros(1, dtype=torch.float64))
    assert big.dtype == torch.float64 and not bg.allocator.advise_huge_pages(big)
    bg.use_huge_pages(0.5)
    assert bg.allocator.huge_page_threshold() == 1 << 19
    assert bg.allocator.advise_huge_pages(
        torch.empty(5 << 18, dtype=torch.float32)
    )  # 5 MiB: 2 MiB pages inside
    assert not bg.allocator.advise_huge_pages(
        torch.empty(1 << 18, dtype=torch.float32)
    )  # 1 MiB: none inside


@pytest.mark.parametrize("bad", [0, -1.0])
def test_a_threshold_that_is_not_positive_raises(bad, huge_threshold):
    with pytest.raises(ValueError, match="min_mib"):
        bg.use_huge_pages(bad)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", 16 << 20), ("on", 16 << 20), ("0", None), ("off", None), ("64", 64 << 20)],
)
def test_the_environment_sets_the_threshold(monkeypatch, raw, expected):
    monkeypatch.setenv("BEYONDGRAD_HUGE_PAGES", raw)
    assert bg.allocator._threshold_from_environment() == expected


def test_a_malformed_environment_setting_raises(monkeypatch):
    monkeypatch.setenv("BEYONDGRAD_HUGE_PAGES", "lots")
    with pytest.raises(ValueError, match="BEYONDGRAD_HUGE_PAGES"):
        bg.allocator._threshold_from_environment()


def test_results_on_advised_memory_match_the_brute_force(huge_threshold):
    """Every result buffer advised (threshold 1 byte): per-sample gradients and the exact
    GGN factor of a small MLP against torch.func in float64."""
    bg.use_huge_pages(1e-6)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    res = bg.compute(model, loss_fn, X, y, bg.BatchGrad(), bg.SqrtGGN(), bg.DiagGGN())
    params = dict(model.named_parameters())

    def loss_one(p, x, t):
        return loss_fn(torch.func.functional_call(model, p, (x[None],)), t[None])

    per_sample = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, X, y)
    for name in params:
        torch.testing.assert_close(res[bg.BatchGrad()][name], per_sample[name])
        rows = res[bg.SqrtGGN()][name]
        torch.testing.assert_close(rows.pow(2).sum((0, 1)), res[bg.DiagGGN()][name])
    flat = torch.cat([res[bg.SqrtGGN()][n].flatten(2) for n in params], 2).flatten(0, 1)
    theta = torch.cat([p.detach().flatten() for p in params.values()])

    def total(v):
        chunks = torch.split(v, [p.numel() for p in params.values()])
        p = {n: c.view_as(params[n]) for n, c in zip(params, chunks)}
        return torch.func.functional_call(model, p, (X,))

    J = torch.func.jacrev(total)(theta)  # [N, C, P]
    prob = torch.softmax(model(X), 1).detach()
    H = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    ggn = torch.einsum("ncp,ncd,ndq->pq", J, H, J)
    torch.testing.assert_close(flat.T @ flat, ggn)
