"""Tied weights in ``bg.linops.KFAC``: the shared parameter's block is the sum of the modules'
Kronecker blocks. Float64 checks against the dense sum built here from the engine's per-module
factors (``bg.compute(..., bg.KFAC)``): products, inverse, log-determinant, trace, eigh; the
closed forms of :mod:`beyondgrad.linalg.kronecker_sum`; EKFAC's refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondgrad as bg
from beyondgrad.linalg import kronecker_sum as ks
from beyondgrad.linops.structures import Kronecker
from beyondgrad.linops.tied import KroneckerSum
from models import case_gpt

V, D, T, N = 7, 4, 3, 5


class TiedMLP(nn.Module):
    """Embedding -> tanh MLP -> output layer (with a bias) tied to the embedding table."""

    def __init__(self, bias: bool = True):
        super().__init__()
        self.emb = nn.Embedding(V, D)
        self.hidden = nn.Linear(D, D)
        self.head = nn.Linear(D, V, bias=bias)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.hidden(self.emb(ids)))).transpose(1, 2)


class TwiceLinear(nn.Module):
    """One weight in two Linear layers with their own biases (no common Kronecker layout)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(D, D)
        self.b = nn.Linear(D, D)
        self.b.weight = self.a.weight
        self.out = nn.Linear(D, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _mlp(bias: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    ids = torch.randint(0, V, (N, T))
    return TiedMLP(bias), ids, torch.randint(0, V, (N, T)), nn.CrossEntropyLoss()


def _twice(seed: int = 0):
    torch.manual_seed(seed)
    return (
        TwiceLinear(),
        torch.randn(N, D, dtype=torch.float64),
        torch.randint(0, 3, (N,)),
        nn.CrossEntropyLoss(),
    )


CASES = {
    "mlp": _mlp,
    "mlp_nobias": lambda: _mlp(False),
    "gpt": case_gpt,
    "twice": _twice,
}


def _positions(model: nn.Module) -> dict[str, torch.Tensor]:
    """Flat positions of every parameter's entries, parameter-shaped."""
    out, start = {}, 0
    for name, p in model.named_parameters():
        out[name] = torch.arange(start, start + p.numel()).reshape(p.shape)
        start += p.numel()
    return out


def dense_kfac(model: nn.Module, loss_fn, X, y, fisher_type: str = "type-2") -> torch.Tensor:
    """The KFAC matrix with every module's block added at its parameters' positions (tied
    parameters collect several blocks), from the engine's per-module factors."""
    pos = _positions(model)
    P = sum(p.numel() for p in model.parameters())
    K = torch.zeros(P, P, dtype=torch.float64)
    blocks = bg.compute(model, loss_fn, X, y, bg.KFAC(fisher_type=fisher_type))[bg.KFAC]
    for block in blocks.values():
        if isinstance(block, bg.DiagonalFactors):
            idx = torch.cat([pos[n].reshape(-1) for n in block.params])
        elif block.order == "A kron B":  # an embedding table [V, d] as is
            idx = pos[block.params[0]].reshape(-1)
        else:  # [O, I] row-major (weight_perm: of the permuted weight), a joint bias last
            w = pos[block.params[0]]
            if block.weight_perm is not None:
                w = w.permute(block.weight_perm)
            w = w.reshape(w.shape[0], -1)
            if block.bias == "joint":
                w = torch.cat([w, pos[block.params[1]].reshape(-1, 1)], 1)
            idx = w.reshape(-1)
        K[idx[:, None], idx[None, :]] += block.to_dense()
    return K


@pytest.mark.parametrize("case", sorted(CASES))
def test_tied_kfac_matches_the_dense_sum(case):
    model, X, y, loss_fn = CASES[case]()
    model = model.double()
    K = bg.linops.KFAC(model, loss_fn, [(X, y)], fisher_type="type-2")
    dense = dense_kfac(model, loss_fn, X, y)
    assert any(isinstance(op, KroneckerSum) for op in K.operators)
    torch.testing.assert_close(K.to_dense(), dense, rtol=1e-12, atol=1e-13)
    eye = torch.eye(dense.shape[0], dtype=dense.dtype)
    for damping in (0.05, 1.0):
        ref = torch.linalg.inv(dense + damping * eye)
        torch.testing.assert_close(K.inverse(damping).to_dense(), ref, rtol=1e-7, atol=1e-8)
        torch.testing.assert_close(K.logdet(damping), torch.logdet(dense + damping * eye))
    torch.testing.assert_close(K.trace(), dense.trace())
    lam = torch.linalg.eigvalsh(dense)
    torch.testing.assert_close(K.eigvalsh(), lam, rtol=1e-8, atol=1e-10)
    vals, U = K.eigh(3)
    torch.testing.assert_close(dense @ U, U * vals, rtol=1e-7, atol=1e-9)
    inv = K.inverse(0.3)
    torch.testing.assert_close(
        inv.trace(), torch.linalg.inv(dense + 0.3 * eye).trace(), rtol=1e-7, atol=1e-9
    )
    torch.testing.assert_close(inv.logdet(), -torch.logdet(dense + 0.3 * eye))


def test_tied_block_is_the_sum_of_two_kronecker_products():
    """The tied embedding/head block of the MLP: ``A_emb kron B_emb + B_head kron [A_head]``
    with the head's bias column, the embedding padded with zeros there."""
    model, X, y, loss_fn = _mlp()
    model = model.double()
    K = bg.linops.KFAC(model, loss_fn, [(X, y)], fisher_type="type-2")
    block = next(op for op in K.operators if isinstance(op, KroneckerSum))
    assert block.shape[0] == V * (D + 1) and block.kron is not None
    terms, (r, c) = block.kron
    assert (r, c) == (V, D + 1) and len(terms) == 2
    emb = K.blocks["emb"]
    padded = next(t for t in terms if torch.equal(t[0], emb.A))
    torch.testing.assert_close(padded[1][:D, :D], emb.B)
    assert bool((padded[1][D] == 0).all()) and bool((padded[1][:, D] == 0).all())


def test_undamped_inverse_is_closed_form():
    """A positive definite tied block (no bias, whose CE null direction makes the sum
    singular): its inverse and log-determinant come from one congruence (no CG)."""
    model, X, y, loss_fn = CASES["mlp_nobias"]()
    model = model.double()
    K = bg.linops.KFAC(model, loss_fn, [(X, y)], fisher_type="type-2")
    block = next(op for op in K.operators if isinstance(op, KroneckerSum))
    dense = block.to_dense()
    assert torch.linalg.eigvalsh(dense).min() > 1e-4
    inv = block.inverse(0.0)
    assert not inv.solve and not inv.approximate
    torch.testing.assert_close(inv.to_dense(), torch.linalg.inv(dense), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(block.logdet(), torch.logdet(dense))
    torch.testing.assert_close(inv.trace(), torch.linalg.inv(dense).trace(), rtol=1e-7, atol=0)
    torch.testing.assert_close(inv.inverse().to_dense(), dense)


def _spd(n: int, rank: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, rank, generator=g, dtype=torch.float64)
    return M @ M.T / rank


def test_damping_folds_into_an_identity_factor():
    """``L1 kron R1 + c I kron R2 + d I``: exact in closed form (no CG)."""
    L1, R1, R2 = _spd(5, 2, 0), _spd(4, 2, 1), _spd(4, 2, 2)
    eye5 = torch.eye(5, dtype=torch.float64)
    K = KroneckerSum(
        [(torch.arange(20), Kronecker(L1, R1)), (torch.arange(20), Kronecker(2.0 * eye5, R2))], 20
    )
    dense = torch.kron(L1, R1) + torch.kron(2.0 * eye5, R2)
    eye = torch.eye(20, dtype=torch.float64)
    inv = K.inverse(0.1)
    assert not inv.solve
    torch.testing.assert_close(inv.to_dense(), torch.linalg.inv(dense + 0.1 * eye))
    torch.testing.assert_close(K.logdet(0.1), torch.logdet(dense + 0.1 * eye))
    assert ks.fold_damping((L1, R1), (_spd(5, 2, 3), R2), 0.1) is None


def test_damped_inverse_cg_and_factored_approximation():
    """Rank-deficient factors, damping that does not fold: CG is exact, the factored closed
    form is an approximation (close, not equal) and labelled so; the two agree at d = 0."""
    L1, R1, L2, R2 = _spd(6, 2, 0), _spd(5, 2, 1), _spd(6, 3, 2), _spd(5, 3, 3)
    terms = [(torch.arange(30), Kronecker(L1, R1)), (torch.arange(30), Kronecker(L2, R2))]
    dense = torch.kron(L1, R1) + torch.kron(L2, R2)
    eye = torch.eye(30, dtype=torch.float64)
    ref = torch.linalg.inv(dense + 0.01 * eye)
    exact = KroneckerSum(terms, 30).inverse(0.01)
    assert exact.solve and not exact.approximate
    torch.testing.assert_close(exact.to_dense(), ref, rtol=1e-7, atol=1e-7)
    approx = KroneckerSum(terms, 30, method="factored").inverse(0.01)
    assert approx.approximate and not approx.solve
    err = float((approx.to_dense() - ref).norm() / ref.norm())
    assert 1e-6 < err < 1.0, err
    torch.testing.assert_close(approx.trace(), approx.to_dense().trace())
    with pytest.raises(ValueError, match="tied_inverse"):
        KroneckerSum(terms, 30, method="bogus")


def test_preconditioner_reduces_cg_iterations():
    """On the MLP's tied block at small damping the factored closed form cuts the CG
    iterations (measured: 17 instead of 43)."""
    model, X, y, loss_fn = _mlp()
    model = model.double()
    K = bg.linops.KFAC(model, loss_fn, [(X, y)], fisher_type="type-2")
    block = next(op for op in K.operators if isinstance(op, KroneckerSum))
    eye = torch.eye(block.shape[0], dtype=torch.float64)
    inv = block.inverse(1e-3)
    inv @ eye
    _, plain = ks.block_cg(lambda V: block @ V + 1e-3 * V, eye, None, block.tol, 500)
    assert inv.info["iterations"] < plain["iterations"] / 2, (inv.info, plain)


def test_split_damping_adds_damping_times_identity_on_commuting_terms():
    """With identity factors the cross terms are multiples of the identity: the trace of the
    factored approximation matches its definition ``prod (f + damping share)``."""
    L, R = 2.0 * torch.eye(3, dtype=torch.float64), 8.0 * torch.eye(2, dtype=torch.float64)
    ((Ld, Rd),) = ks.split_damping([(L, R)], 4.0)
    # pi = sqrt(2 / 8) = 0.5, root = 2: L + 1 I, R + 4 I
    torch.testing.assert_close(Ld, 3.0 * torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(Rd, 12.0 * torch.eye(2, dtype=torch.float64))


def test_kfac_operator_with_tied_inverse_factored():
    model, X, y, loss_fn = _mlp()
    model = model.double()
    K = bg.linops.KFAC(model, loss_fn, [(X, y)], fisher_type="mc", tied_inverse="factored")
    inv = K.inverse(0.1)
    block = next(op for op in inv.operators if hasattr(op, "approximate"))
    assert block.approximate
    with pytest.raises(ValueError, match="tied_inverse"):
        bg.linops.KFAC(model, loss_fn, [(X, y)], tied_inverse="cg")


def test_tied_params_subset_and_ekfac_refusal():
    model, X, y, loss_fn = _mlp()
    model = model.double()
    names = [n for n, _ in model.named_parameters()]
    K = bg.linops.KFAC(model, loss_fn, [(X, y)], fisher_type="type-2", params=names[:1])
    assert K.shape[0] == V * D  # the shared table alone: the sum without the head's bias
    full = dense_kfac(model, loss_fn, X, y)
    torch.testing.assert_close(K.to_dense(), full[: V * D, : V * D])
    with pytest.raises(RuntimeError, match="tied weights"):
        bg.linops.EKFAC(model, loss_fn, [(X, y)], fisher_type="type-2")
    rest = [n for n in names if n not in ("emb.weight", "head.bias")]
    bg.linops.EKFAC(model, loss_fn, [(X, y)], fisher_type="type-2", params=rest)


def test_large_tied_block_refuses_a_dense_spectrum(monkeypatch):
    model, X, y, loss_fn = _mlp()
    model = model.double()
    K = bg.linops.KFAC(model, loss_fn, [(X, y)], fisher_type="type-2")
    monkeypatch.setattr(KroneckerSum, "dense_limit", 10)
    with pytest.raises(ValueError, match="dense_limit"):
        K.eigvalsh()
    K.trace()  # exact without the dense block


def test_gpt2_tied_embedding_and_head():
    """The zoo's tiny GPT-2 (``wte`` tied to ``lm_head``): KFAC with the tied block against
    the dense sum (skipped without transformers)."""
    pytest.importorskip("transformers")
    from zoo import case

    model, X, y, loss_fn = case("gpt2")
    K = bg.linops.KFAC(model, loss_fn, [(X, y)], fisher_type="type-2")
    assert sum(isinstance(op, KroneckerSum) for op in K.operators) == 1
    dense = dense_kfac(model, loss_fn, X, y)
    torch.testing.assert_close(K.to_dense(), dense, rtol=1e-12, atol=1e-13)
    eye = torch.eye(dense.shape[0], dtype=dense.dtype)
    ref = torch.linalg.inv(dense + 0.1 * eye)
    torch.testing.assert_close(K.inverse(0.1).to_dense(), ref, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(K.trace(), dense.trace())
    torch.testing.assert_close(K.logdet(0.1), torch.logdet(dense + 0.1 * eye))


def test_laplace_kronecker_structure_refuses_tied_weights():
    """Laplace's Kronecker structures hold one block per parameter: a clear refusal."""
    model, X, y, loss_fn = _mlp()
    model = model.double()
    K = bg.linops.KFAC(model, loss_fn, [(X, y)], fisher_type="type-2")
    assert K.tied_params == ["emb.weight"]
    with pytest.raises(ValueError, match="tied weights"):
        bg.laplace.Laplace(model, loss_fn, [(X, y)], structure="kfac")
