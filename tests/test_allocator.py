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
else:  # the smallest thresholds: every block of 1 MiB or more is returned when freed
    assert bg.retain_freed_memory(trim_threshold_mib=1, mmap_threshold_mib=1)

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def round_trip():  # three 8 MiB blocks freed together: 24 MiB of free heap top at once
    blocks = [torch.empty(2 << 20) for _ in range(3)]
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


def _faults_per_round(mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the thresholds are glibc's")
def test_retained_blocks_are_not_faulted_in_again():
    pages = 3 * (8 << 20) // 4096
    released, retained = _faults_per_round("release"), _faults_per_round("retain")
    assert released > 0.9 * pages  # returned when freed: faulted in again every round
    assert retained < pages / 16  # kept: later rounds reuse the mapped pages


@pytest.mark.parametrize(
    "kwargs", [{"trim_threshold_mib": 0}, {"trim_threshold_mib": 4096}, {"mmap_threshold_mib": 64}]
)
def test_thresholds_out_of_range_raise(kwargs):
    with pytest.raises(ValueError, match="threshold_mib must be in"):
        bg.retain_freed_memory(**kwargs)
