"""KFACAdam: Adam in the eigenbasis of KFAC's factors, against a dense float64 reference."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from beyondgrad.factors import to_block_layout
from beyondgrad.optim import KFACAdam


def _model(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mlp":  # two 6 x 6 layers: refreshed and rotated in one batched product
        layers = [nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 6)]
        return nn.Sequential(*layers, nn.Tanh(), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3)
    ).double()


def _batches(kind: str, steps: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    shape = (12, 5) if kind == "mlp" else (6, 2, 4, 4)
    return [
        (
            torch.randn(*shape, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (shape[0],), generator=g),
        )
        for _ in range(steps)
    ]


def _step(opt, model, loss_fn, X, y) -> None:
    opt.zero_grad()
    with opt.capture():
        loss = loss_fn(model(X), y)
    loss.backward()
    opt.step()


def _in_layout(t: torch.Tensor, state: dict, bias: bool) -> torch.Tensor:
    """A weight or bias tensor as ``[G, rows, cols]`` of the layer's factors."""
    G = state["A"].shape[0] if state["A"].ndim == 3 else 1
    if bias:
        return t.reshape(G, -1, 1)
    return to_block_layout(t[None], None, state["order"], state["weight_perm"], G)[0]


def _matrix(tensors: dict[str, torch.Tensor], state: dict) -> torch.Tensor:
    names = state["params"]
    return torch.cat([_in_layout(tensors[n], state, i == 1) for i, n in enumerate(names)], -1)


def _reference_basis(M: torch.Tensor, Q: torch.Tensor | None, mode: str, max_dim=None):
    """The basis of one side after a refresh and the order of the old basis' columns in it."""
    if max_dim is not None and M.shape[-1] > max_dim:  # too wide: the coordinate axes
        return torch.eye(M.shape[-1], dtype=M.dtype), torch.arange(M.shape[-1])
    if mode == "eigh":
        return torch.linalg.eigh(M)[1], None
    if Q is None:  # "power" starts from the coordinate axes
        Q = torch.eye(M.shape[-1], dtype=M.dtype)
    order = torch.argsort(torch.diagonal(Q.T @ M @ Q), descending=True)
    return torch.linalg.qr(M @ Q[:, order])[0], order


@pytest.mark.parametrize("max_dim", [None, 6])
@pytest.mark.parametrize("mode", ["eigh", "power"])
@pytest.mark.parametrize("kind", ["mlp", "conv"])
def test_kfac_adam_is_adam_in_the_eigenbasis_of_the_factors(kind, mode, max_dim):
    """Three steps with a refresh at each (the basis changes; the second moments are kept,
    with ``"power"`` reordered with the basis' columns), Adam's first moment, against
    ``kron(Q_L, Q_R)`` applied densely to ``vec(G)``; with ``max_basis_dim=6`` the sides
    wider than 6 (the biased 7- and 19-, 49-wide inputs) keep the coordinate axes."""
    model, loss_fn = _model(kind), nn.CrossEntropyLoss()
    lr, mu, beta2, eps = 0.05, 0.5, 0.8, 1e-6
    opt = KFACAdam(
        model, loss_fn, lr=lr, momentum=mu, beta2=beta2, eps=eps, fisher_type="type-2",
        refresh_every=1, ema=0.7, basis_update=mode, max_basis_dim=max_dim,
    )  # fmt: skip
    params = dict(model.named_parameters())
    v: dict[str, torch.Tensor] = {}
    m: dict[str, torch.Tensor] = {}
    bases: dict[str, tuple] = {}
    for X, y in _batches(kind, 3):
        before = {n: p.detach().clone() for n, p in params.items()}
        _step(opt, model, loss_fn, X, y)
        grads = {n: p.grad for n, p in params.items()}
        delta = {n: params[n].detach() - before[n] for n in params}
        for name, state in opt.layers.items():
            A, B = (f if f.ndim == 3 else f[None] for f in (state["A"], state["B"]))
            left, right = (A, B) if state["order"] == "A kron B" else (B, A)
            G = _matrix(grads, state)
            expected = []
            for k in range(G.shape[0]):
                key = f"{name}/{k}"
                old = bases.get(key, (None, None))
                q_left, rows = _reference_basis(left[k], old[0], mode, max_dim)
                q_right, cols = _reference_basis(right[k], old[1], mode, max_dim)
                bases[key] = (q_left, q_right)
                Q = torch.kron(q_left.contiguous(), q_right.contiguous())
                r = Q.T @ G[k].reshape(-1)
                if key in v and mode == "power":  # the moments follow the basis' columns
                    v[key] = v[key].reshape(G[k].shape)[rows][:, cols].reshape(-1)
                v[key] = r**2 if key not in v else beta2 * v[key] + (1 - beta2) * r**2
                d = Q @ (r / (v[key].sqrt() + eps))
                m[key] = (1 - mu) * d if key not in m else mu * m[key] + (1 - mu) * d
                expected.append(-lr * m[key].reshape(G[k].shape))
            torch.testing.assert_close(_matrix(delta, state), torch.stack(expected))
    if kind == "mlp":  # the LayerNorm goes to the AdamW fallback (not in opt.layers)
        assert opt.routes["4.weight"][0] == "kfac-adam" and opt.routes["6.weight"][0] == "adamw"


def test_power_basis_converges_to_the_eigenvectors():
    from beyondgrad.optim.kfac_adam import power_basis

    g = torch.Generator().manual_seed(0)
    U = torch.linalg.qr(torch.randn(2, 6, 6, generator=g, dtype=torch.float64))[0]
    M = (
        U
        @ torch.diag_embed(
            torch.tensor([[9.0, 5, 3, 2, 1, 0.5], [4, 3.5, 3, 1, 0.2, 0.1]], dtype=torch.float64)
        )
        @ U.mT
    )
    Q = torch.linalg.qr(torch.randn(2, 6, 6, generator=g, dtype=torch.float64))[0]
    for _ in range(200):
        quotients, Q, order = power_basis(M, Q)
        assert sorted(order[0].tolist()) == list(range(6))
    torch.testing.assert_close(Q.mT @ Q, torch.eye(6, dtype=torch.float64).expand(2, 6, 6))
    torch.testing.assert_close(Q.mT @ M @ Q, torch.diag_embed(quotients), atol=1e-8, rtol=0)
    torch.testing.assert_close(quotients, torch.linalg.eigvalsh(M).flip(-1))


def test_kfac_adam_batches_layers_of_one_shape_and_keeps_their_moments_stacked():
    model, loss_fn = _model("mlp"), nn.CrossEntropyLoss()
    opt = KFACAdam(model, loss_fn, refresh_every=2, fisher_type="type-2")
    for X, y in _batches("mlp", 3):
        _step(opt, model, loss_fn, X, y)
    first, second = opt.layers["2"]["second_moment"], opt.layers["4"]["second_moment"]
    assert first._base is not None and first._base is second._base  # one stack, in place
    ptr = first._base.data_ptr()
    _step(opt, model, loss_fn, *_batches("mlp", 1, seed=5)[0])
    assert opt.layers["2"]["second_moment"]._base.data_ptr() == ptr


@pytest.mark.parametrize("max_dim", [None, 6])
def test_kfac_adam_resumes_bit_identically(max_dim):
    loss_fn = nn.CrossEntropyLoss()
    batches = _batches("mlp", 4)
    model = _model("mlp")
    settings = {"refresh_every": 3, "stats_every": 2, "max_basis_dim": max_dim}
    opt = KFACAdam(model, loss_fn, **settings)
    for X, y in batches[:2]:
        _step(opt, model, loss_fn, X, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    assert all("second_moment" in s for s in opt.state_dict()["beyondgrad"]["layers"].values())
    for X, y in batches[2:]:
        _step(opt, model, loss_fn, X, y)
    buf.seek(0)
    saved = torch.load(buf, weights_only=False)
    resumed = _model("mlp", seed=1)
    resumed.load_state_dict(saved["model"])
    opt2 = KFACAdam(resumed, loss_fn, **settings)
    opt2.load_state_dict(saved["opt"])
    for X, y in batches[2:]:
        _step(opt2, resumed, loss_fn, X, y)
    for (n, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n


def test_kfac_adam_rejects_what_does_not_apply():
    model, loss_fn = _model("mlp"), nn.CrossEntropyLoss()
    with pytest.raises(TypeError, match="damping"):
        KFACAdam(model, loss_fn, damping=1e-3)
    with pytest.raises(TypeError, match="damping_mode"):
        KFACAdam(model, loss_fn, damping_mode="pi")
    with pytest.raises(ValueError, match="beta2"):
        KFACAdam(model, loss_fn, beta2=1.0)
    with pytest.raises(ValueError, match="eps"):
        KFACAdam(model, loss_fn, eps=0.0)
    with pytest.raises(ValueError, match="basis_update"):
        KFACAdam(model, loss_fn, basis_update="qr")
    with pytest.raises(ValueError, match="ownership"):
        KFACAdam(model, loss_fn, basis_update="power", ownership="owner")
    for bad in (0, 2.5, True, "64"):
        with pytest.raises(ValueError, match="max_basis_dim"):
            KFACAdam(model, loss_fn, max_basis_dim=bad)
    with pytest.raises(ValueError, match="max_basis_dim with ownership"):
        KFACAdam(model, loss_fn, max_basis_dim=4, ownership="owner")
    with pytest.raises(ValueError, match="not a KFACAdam"):
        KFACAdam(model, loss_fn).load_state_dict(
            __import__("beyondgrad").optim.KFAC(model, loss_fn).state_dict()
        )


def test_the_factory_builds_kfac_adam_at_its_amortized_settings():
    from beyondgrad.app.optimizers import DEFAULT_LR, make_optimizer

    model, loss_fn = _model("mlp"), nn.CrossEntropyLoss()
    opt = make_optimizer("kfac-adam", model, loss_fn)
    assert isinstance(opt, KFACAdam) and opt.stats_every == 20
    group = opt.param_groups[0]
    assert group["refresh_every"] == 20 and group["lr"] == DEFAULT_LR["kfac-adam"]
    assert group["adam_lr"] == group["lr"] and opt.kl_clip is None
