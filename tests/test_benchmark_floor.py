"""``benchmarks/floor.py``: its per-layer FLOP formulas against PyTorch's own count of the
same passes, and its table on the mlp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "benchmarks"))  # appended: tests/zoo.py stays ahead of theirs

import floor  # noqa: E402


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    conv = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
        nn.Conv2d(8, 8, 3, bias=False), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(8 * 3 * 3, 5),
    )  # fmt: skip
    mlp = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 4, bias=False))
    return {"conv": (conv, torch.randn(5, 3, 8, 8)), "mlp": (mlp, torch.randn(5, 7))}


@pytest.mark.parametrize("name", ["conv", "mlp"])
def test_forward_backward_formula_matches_pytorchs_count(name: str) -> None:
    """``2F + B`` (the layers' forward, weight and input gradients) is exactly what PyTorch's
    FLOP formulas count for a forward+backward (padding, a layer without bias, the first
    layer without an input gradient). Not with strides or groups: there PyTorch's backward
    formula counts more (the input gradient as a transposed convolution over every input
    position; a grouped convolution's gradients as if ungrouped)."""
    model, X = _models()[name]
    layers = floor.layers_of(model, X)
    assert [la.input_grad for la in layers] == [False] + [True] * (len(layers) - 1)
    with floor.counted() as count:
        model(X).square().sum().backward()
    assert floor.floors(layers, K=3)["fwd+bwd"] == count.total > 0


def test_floor_of_a_linear_layer_by_hand() -> None:
    """One ``Linear(6, 4)`` on 5 samples with K = 2 vectors: forward 2*5*4*6 = 240, no input
    gradient; DiagGGN adds 2*5*4*6 = 240; KFLR adds 5*2*4*5 + 5*7*8 = 480."""
    layers = floor.layers_of(nn.Linear(6, 4), torch.randn(5, 6))
    got = floor.floors(layers, K=2)
    assert got == {"fwd+bwd": 480, "exact DiagGGN": 480, "KFAC type-2 (KFLR)": 720}


def test_convolution_diagonal_takes_the_cheaper_of_direct_and_gram() -> None:
    """A layer with many positions and few inputs per output: the per-sample Gram route
    (``2 N L^2 O (K + I)``) is not cheaper than the direct one (``K`` times a pass); with few
    positions and many inputs per output, it is."""
    la = floor.Layer(N=2, L=16, O=3, I=4, bias=True, input_grad=False)
    direct, gram = 5 * la.pass_flops, 2 * 2 * 16**2 * 3 * (5 + 4)
    assert (
        floor.floors([la], K=5)["exact DiagGGN"]
        == la.pass_flops + min(direct, gram)
        == la.pass_flops + direct
    )
    la = floor.Layer(N=2, L=2, O=3, I=400, bias=False, input_grad=False)
    direct, gram = 50 * la.pass_flops, 2 * 2 * 2**2 * 3 * (50 + 400)
    assert (
        floor.floors([la], K=50)["exact DiagGGN"] == la.pass_flops + gram < la.pass_flops + direct
    )


def test_script_writes_the_table(tmp_path: Path) -> None:
    """On the mlp: beyondgrad's executed FLOPs of the exact diagonal are the floor's (the
    per-layer contraction of squared factors), its time and the counts are recorded."""
    paths = [str(ROOT / "src"), str(ROOT / "benchmarks")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    out = tmp_path / "floor.md"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "floor.py"), "--problems", "mlp"]
    done = subprocess.run(
        [*cmd, "--reps", "1", "--threads", "1", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["quantity"] for r in rows] == list(floor.QUANTITIES)
    diag = rows[0]
    assert diag["fwd_bwd_flops"] == diag["fwd_bwd_floor_flops"]
    assert diag["ours_flops"] == diag["floor_flops"]
    assert all(r["ours_ms"] > 0 and r["base_ms"] > 0 for r in rows)
    assert out.read_text().count("| mlp |") == 2
