"""Fisher merging with Kronecker-factored Fishers, in float64 against independent definitions:
the factors from forward/backward hooks and per-example loops, the merged layer from a dense
solve of the Kronecker-structured normal equations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondgrad as bg

DT = torch.float64


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3), nn.LayerNorm(3)).to(DT)


def data(seed: int, n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=DT), torch.randint(0, 3, (n,), generator=g)


def hooked_empirical_kfac(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> dict:
    """Per Linear: ``A = mean_n a_n a_n^T`` (bias-augmented input), ``B = mean_n g_n g_n^T``
    (``g_n`` the gradient of example ``n``'s loss in the layer output), by hooks and a loop."""
    out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        rows, grads = [], []
        for n in range(len(y)):
            seen: dict[str, torch.Tensor] = {}

            def hook(m: nn.Module, inp: tuple, o: torch.Tensor, seen: dict = seen) -> None:
                seen["a"], seen["z"] = inp[0].detach(), o
                o.retain_grad()

            h = mod.register_forward_hook(hook)
            loss = nn.functional.cross_entropy(model(X[n : n + 1]), y[n : n + 1], reduction="sum")
            loss.backward()
            h.remove()
            model.zero_grad()
            rows.append(torch.cat([seen["a"][0], torch.ones(1, dtype=DT)]))
            grads.append(seen["z"].grad[0])
        a, g = torch.stack(rows), torch.stack(grads)
        out[name] = (a.T @ a / len(y), g.T @ g / len(y))
    return out


def test_kronecker_fisher_equals_hooked_factors_and_diagonal_for_the_rest() -> None:
    model, (X, y) = mlp(0), data(0)
    batches = [(X[:3], y[:3]), (X[3:], y[3:])]
    blocks, diag = bg.merging.kronecker_fisher(model, nn.CrossEntropyLoss(), batches, "empirical")
    ref = hooked_empirical_kfac(model, X, y)
    assert set(blocks) == set(ref) == {"0", "2"}
    for name, (A, B) in ref.items():
        torch.testing.assert_close(blocks[name].A, A)
        torch.testing.assert_close(blocks[name].B, B)
        assert (blocks[name].weight, blocks[name].bias) == (f"{name}.weight", f"{name}.bias")
    full = bg.merging.diagonal_fisher(model, nn.CrossEntropyLoss(), (X, y), "empirical")
    assert set(diag) == {"3.weight", "3.bias"}
    for key, value in diag.items():
        torch.testing.assert_close(value, full[key])


def dense_merge(Ws: list, factors: list, lam: list, damping: float) -> torch.Tensor:
    """Solve ``sum_i lam_i (B~_i kron A~_i) w = sum_i lam_i (B~_i kron A~_i) w_i`` densely."""

    def damp(M: torch.Tensor) -> torch.Tensor:
        return M + damping * torch.trace(M) / M.shape[0] * torch.eye(M.shape[0], dtype=DT)

    K = [lam_i * torch.kron(damp(B), damp(A)) for (A, B), lam_i in zip(factors, lam)]
    rhs = sum(k @ W.reshape(-1) for k, W in zip(K, Ws))
    return torch.linalg.solve(sum(K), rhs).reshape(Ws[0].shape)


def random_psd(n: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    M = torch.randn(n, rank, generator=gen, dtype=DT)
    return M @ M.T


@pytest.mark.parametrize("count", [2, 3])
def test_kfac_merge_layer_solves_the_normal_equations(count: int) -> None:
    gen = torch.Generator().manual_seed(count)
    Ws = [torch.randn(3, 5, generator=gen, dtype=DT) for _ in range(count)]
    factors = [(random_psd(5, 2, gen), random_psd(3, 1, gen)) for _ in range(count)]
    lam = [0.2, 0.8] if count == 2 else [0.2, 0.5, 0.3]
    ours = bg.merging.kfac_merge_layer(Ws, factors, lam, damping=0.05)
    torch.testing.assert_close(ours, dense_merge(Ws, factors, lam, 0.05))


def test_fisher_merge_kfac_writes_every_layer() -> None:
    models, sets = [mlp(0), mlp(1)], [data(0), data(1, n=5)]
    loss = nn.CrossEntropyLoss()
    merged = bg.merging.fisher_merge(
        models, loss, sets, fisher="type-2", structure="kfac", weights=[1.0, 3.0], damping=0.1
    )
    state = merged.state_dict()
    fishers = [bg.merging.kronecker_fisher(m, loss, d, "type-2") for m, d in zip(models, sets)]
    for name in ("0", "2"):
        Ws = [
            torch.cat(
                [m.state_dict()[f"{name}.weight"], m.state_dict()[f"{name}.bias"][:, None]], 1
            )
            for m in models
        ]
        ref = dense_merge(Ws, [(f[0][name].A, f[0][name].B) for f in fishers], [0.25, 0.75], 0.1)
        torch.testing.assert_close(state[f"{name}.weight"], ref[:, :-1])
        torch.testing.assert_close(state[f"{name}.bias"], ref[:, -1])
    f0, f1 = (f[1]["3.weight"].clamp_min(1e-8) for f in fishers)
    w0, w1 = (m.state_dict()["3.weight"] for m in models)
    torch.testing.assert_close(state["3.weight"], (f0 * w0 + 3 * f1 * w1) / (f0 + 3 * f1))
    default = bg.merging.fisher_merge(models, loss, sets, fisher="type-2", weights=[1.0, 3.0])
    for key, value in default.state_dict().items():  # structure="kfac" is the default
        torch.testing.assert_close(value, state[key])
    with pytest.raises(ValueError, match="structure"):
        bg.merging.fisher_merge(models, loss, sets, structure="full")
    with pytest.raises(ValueError, match="damping"):
        bg.merging.kfac_merge_layer(
            [Ws[0]], [(torch.eye(6, dtype=DT), torch.eye(3, dtype=DT))], [1.0], 0.0
        )
