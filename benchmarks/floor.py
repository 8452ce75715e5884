"""The arithmetic floor of the exact curvature quantities: how many floating-point operations
any implementation must run, next to what beyondgrad runs and how long it takes.

For a model whose cost sits in ``Linear``/``Conv`` layers (the built-in ``mlp`` and ``cnn``),
with ``N`` samples, ``K`` backpropagated vectors per sample (cross-entropy over ``C``
classes: ``K = C - 1``, the rank of its Hessian) and, per layer, ``L`` output positions per
sample, ``O`` output channels and ``I`` inputs per output (``C_in / groups`` x kernel size),
counting a multiply-add as 2:

* forward ``F = sum 2 N L O I``; backward ``F`` for the weight gradients plus ``B = sum 2 N L O
  I`` over the layers whose input needs a gradient (all but the first); a forward+backward is
  ``2F + B``.
* every exact quantity: one forward and ``K`` backpropagated vectors, ``F + K B`` (the
  element-wise layers and the loss are not counted: a lower bound).
* exact ``DiagGGN``, per layer: the squared per-sample, per-vector weight gradients. A layer
  with ``L = 1`` needs ``2 N O I`` (``sum_n (sum_k g_nk^2) (a_n^2)^T``); one with ``L > 1``
  the cheaper of ``2 N K L O I`` (each gradient, then squared) and ``2 N L^2 O (K + I)``
  (per sample, the Gram matrices of the positions).
* KFAC type-2 (KFLR), per layer, both factors as symmetric products (half the entries):
  ``N K L O (O + 1)`` (output gradients) and ``N L I' (I' + 1)`` (inputs, ``I' = I + 1``
  with a bias).

Every count assumes the floor runs at the FLOP rate of the model's own forward+backward: the
*floor x* column is the least time ratio to a forward+backward an implementation can reach
at that rate. beyondgrad's executed operations are counted with PyTorch's FLOP formulas
(``torch.utils.flop_counter``) on the ops it dispatches (those formulas count more than the
useful multiply-adds for the input gradient of a strided or grouped convolution; the built-in
problems have neither); its time is the median of calls alternated with a plain
forward+backward in one process.

    python benchmarks/floor.py [--problems mlp cnn] [--reps 15] [--threads 2] [--out PATH]

Writes ``benchmarks/results/floor_cpu.md`` (and ``.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

import beyondgrad as bg
import harness as h
from beyondgrad.app.tasks import make_problem

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
QUANTITIES: dict[str, Callable[[], Any]] = {
    "exact DiagGGN": bg.DiagGGN,
    "KFAC type-2 (KFLR)": lambda: bg.KFAC(fisher_type="type-2"),
}


@dataclass(frozen=True)
class Layer:
    """The sizes of one ``Linear``/``Conv`` layer's call that set its cost."""

    N: int  # samples
    L: int  # output positions per sample
    O: int  # output channels (features)
    I: int  # inputs per output: C_in / groups x kernel size
    bias: bool
    input_grad: bool  # whether its input needs a gradient (a layer after a parameter)

    @property
    def pass_flops(self) -> int:
        """Flops of one pass of the layer (forward, weight or input gradient): ``2 N L O I``."""
        return 2 * self.N * self.L * self.O * self.I


def layers_of(model: nn.Module, X: Tensor) -> list[Layer]:
    """The sizes of every ``Linear``/``Conv`` call of one forward pass on ``X``."""
    found: list[Layer] = []

    def hook(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> None:
        N, O = out.shape[0], module.weight.shape[0]
        L = out.numel() // (N * O)
        I = module.weight[0].numel()  # inputs per output
        bias = getattr(module, "bias", None) is not None
        found.append(Layer(N, L, O, I, bias, bool(args[0].requires_grad)))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, LAYERS)]
    try:
        with torch.enable_grad():
            model(X)
    finally:
        for handle in handles:
            handle.remove()
    return found


def floors(layers: list[Layer], K: int) -> dict[str, int]:
    """The floor flops (see the module's docstring) of a forward+backward and of each
    quantity with ``K`` backpropagated vectors per sample."""
    F = sum(la.pass_flops for la in layers)
    B = sum(la.pass_flops for la in layers if la.input_grad)
    diag = sum(
        2 * la.N * la.O * la.I
        if la.L == 1
        else min(K * la.pass_flops, 2 * la.N * la.L**2 * la.O * (K + la.I))
        for la in layers
    )
    kflr = sum(
        la.N * K * la.L * la.O * (la.O + 1) + la.N * la.L * (la.I + la.bias) * (la.I + la.bias + 1)
        for la in layers
    )
    vectors = F + K * B
    return {
        "fwd+bwd": 2 * F + B,
        "exact DiagGGN": vectors + diag,
        "KFAC type-2 (KFLR)": vectors + kflr,
    }


class FlopCount(TorchDispatchMode):
    """Sums PyTorch's FLOP formulas over the ops dispatched inside (``total``, per op name in
    ``by_op``); ops without a formula (element-wise, reductions) count zero. Not
    ``torch.utils.flop_counter.FlopCounterMode``: it tracks modules with global hooks, which
    change the model's state as beyondgrad's per-model caches see it, so that
    ``bg.compute`` probes the model again inside the count (its forward counted twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.total = 0
        self.by_op: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            flops = int(formula(*args, **kwargs, out_val=out))
            name = str(func._overloadpacket).removeprefix("aten.")
            self.by_op[name] = self.by_op.get(name, 0) + flops
            self.total += flops
        return out


@contextmanager
def counted() -> Iterator[FlopCount]:
    """A :class:`FlopCount` active inside the block."""
    mode = FlopCount()
    with mode:
        yield mode


def measure(name: str, reps: int) -> list[dict[str, Any]]:
    """One problem's rows: floors, executed flops and times of each quantity."""
    p = make_problem(name)
    model, loss_fn, X, y = p.model, p.loss_fn, p.X, p.y
    with torch.no_grad():
        K = p.model(X).shape[1] - 1  # cross-entropy (classes on axis 1): its Hessian's rank

    def fwd_bwd() -> None:
        model.zero_grad(set_to_none=True)
        loss_fn(model(X), y).backward()

    floor = floors(layers_of(model, X), K)
    with counted() as fb:
        fwd_bwd()
    rows = []
    for label, make in QUANTITIES.items():
        q = make()
        call = lambda q=q: bg.compute(model, loss_fn, X, y, q)  # noqa: E731
        call()  # the probes and caches of a first call
        with counted() as ours:
            call()
        times = h.interleaved_medians({"base": fwd_bwd, "ours": call}, reps)
        rows.append({
            "problem": name, "quantity": label, "K": K,
            "fwd_bwd_flops": fb.total, "fwd_bwd_floor_flops": floor["fwd+bwd"],
            "floor_flops": floor[label], "ours_flops": ours.total, "ours_by_op": ours.by_op,
            "base_ms": 1e3 * times["base"], "ours_ms": 1e3 * times["ours"],
        })  # fmt: skip
        h.log(f"{name} {label}: {rows[-1]['ours_ms']:.1f} ms")
    return rows


def render(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The markdown table."""
    out = [
        "# Exact curvature: the arithmetic floor, and beyondgrad against it",
        "",
        f"*Generated {env['date']} by `{env['command']}`.*",
        "",
        f"* **Machine**: {env['machine']}; torch {env['torch']}, {env['threads']} threads; "
        f"beyondgrad at commit {env['git']}.",
        "* **Floor** (`benchmarks/floor.py`'s docstring): the flops any implementation runs "
        "(forward, K backpropagated vectors, the quantity's own products), counted per "
        "Linear/Conv layer. *floor x*: floor flops / a forward+backward's flops, the least "
        "time ratio at the forward+backward's FLOP rate.",
        "* **beyondgrad**: flops of the ops it dispatches (`torch.utils.flop_counter`'s "
        "formulas), and its median time over a forward+backward's, alternated in one process.",
        "",
        "| problem | quantity | K | fwd+bwd GFLOP (counted / formula) | floor GFLOP | floor x "
        "| beyondgrad GFLOP (x floor) | beyondgrad time x fwd+bwd | FLOP rate x fwd+bwd's |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        floor_x = r["floor_flops"] / r["fwd_bwd_flops"]
        time_x = r["ours_ms"] / r["base_ms"]
        rate = (r["ours_flops"] / r["fwd_bwd_flops"]) / time_x
        ours_x = r["ours_flops"] / r["floor_flops"]
        out.append(
            f"| {r['problem']} | {r['quantity']} | {r['K']} | {r['fwd_bwd_flops'] / 1e9:.3g} / "
            f"{r['fwd_bwd_floor_flops'] / 1e9:.3g} | {r['floor_flops'] / 1e9:.3g} | "
            f"**{floor_x:.2f}** | {r['ours_flops'] / 1e9:.3g} ({ours_x:.2f}) "
            f"| **{time_x:.2f}** | {rate:.2f} |"
        )
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", nargs="+", default=["mlp", "cnn"])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "floor_cpu.md")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = [r for name in args.problems for r in measure(name, args.reps)]
    env = {
        "date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "command": "python benchmarks/floor.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{h.cpu_model()}, {os.cpu_count()} logical CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "git": h.git_revision(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(env, rows))
    args.out.with_suffix(".json").write_text(json.dumps({"env": env, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
