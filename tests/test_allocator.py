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
