"""Layers called without a sample axis (position embeddings on ``arange(T)`` or ``[1, T]``,
a relative-attention bias on ``[T, T]``, a projection of learned latents) have exact
per-sample quantities, also when the number of samples equals the sequence length (the
coincidence that a length-based inference of the sample axis gets wrong)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import beyondgrad as bg
from models import case_shared_axis
from oracles.curvature import batch_diag_ggn, diag_ggn, ggn
from oracles.first_order import reference
from test_first_order import assert_close

SIZES = [(3, 3), (4, 4), (3, 4), (1, 4)]  # (N, T); 3 latents: (3, 3) fools every length test


@pytest.mark.parametrize(("N", "T"), SIZES)
def test_first_order_quantities_match_oracle(N, T):
    model, X, y, loss_fn = case_shared_axis(N, num_samples=N, T=T)
    ref = reference(model, loss_fn, X, y)
    quantities = [bg.BatchGrad(), bg.BatchL2(), bg.BatchDot(), bg.Variance(), bg.Grad()]
    res = bg.compute(model, loss_fn, X, y, *quantities)
    for q in quantities:
        assert_close(res[q], ref[type(q).__name__], f"{type(q).__name__} N={N} T={T}")
    assert res.rules["wpe.weight"] == "embedding"
    assert res.rules["q_proj.weight"] == "linear"


@pytest.mark.parametrize(("N", "T"), [(4, 4), (3, 4)])
def test_ggn_diagonals_match_oracle(N, T):
    model, X, y, loss_fn = case_shared_axis(1, num_samples=N, T=T)
    ref = ggn(model, loss_fn, X, y)
    res = bg.compute(model, loss_fn, X, y, bg.DiagGGN(), bg.BatchDiagGGN())
    assert_close(res[bg.DiagGGN], diag_ggn(ref), "DiagGGN")
    assert_close(res[bg.BatchDiagGGN], batch_diag_ggn(ref), "BatchDiagGGN")


def test_subsampling_and_mc_vectors_are_consistent():
    """The shared outputs' per-sample pass reuses the main pass's Monte-Carlo vectors: the
    per-sample MC diagonals still sum to the MC diagonal."""
    model, X, y, loss_fn = case_shared_axis(2, num_samples=4, T=4)
    gen = torch.Generator().manual_seed(0)
    res = bg.compute(
        model,
        loss_fn,
        X,
        y,
        bg.DiagGGN(mc_samples=3),
        bg.BatchDiagGGN(mc_samples=3),
        generator=gen,
    )
    for name, value in res[bg.DiagGGN(mc_samples=3)].items():
        total = res[bg.BatchDiagGGN(mc_samples=3)][name].sum(0)
        torch.testing.assert_close(total, value, rtol=1e-9, atol=1e-12, msg=name)
    ref = reference(model, loss_fn, X, y, index=torch.tensor([0, 2]))
    sub = bg.compute(model, loss_fn, X, y, bg.BatchGrad(), subsampling=[0, 2])
    assert_close(sub[bg.BatchGrad], ref["BatchGrad"], "BatchGrad subsampled")


def test_shared_layer_kronecker_factors_use_per_sample_gradients():
    """KFAC's output factor of a layer without a sample axis sums the outer products of the
    per-sample output gradients (type-2, exact vectors), not of their batch sum."""
    model, X, y, loss_fn = case_shared_axis(3, num_samples=3, T=4)
    with bg.capture(model, loss_fn, vectors=[("exact", 0)]) as session:
        loss = loss_fn(model(X), y)
    stats = session.statistics(loss)
    kron = stats.kronecker("q_proj", ("exact", 0))
    assert kron is not None
    # brute force: per sample and vector, d(v . output)/d(q_proj output) [L, d]
    grads = stats.call_gradients[("exact", 0)]
    call = stats.layers[[u.name for u in stats.layers].index("q_proj")].calls[0]
    g = grads[id(call)][0]  # [K, N, L, d]
    assert g.shape[1] == 3
    flat = g.reshape(-1, g.shape[-1])
    torch.testing.assert_close(kron.B_sum[0], flat.T @ flat)
    # and the per-sample output gradients sum to the batch gradient of the layer output
    with bg.capture(model, loss_fn, vectors=[("grad", 1)]) as session:
        loss = loss_fn(model(X), y)
    stats = session.statistics(loss, retain_graph=True)
    call = stats.layers[[u.name for u in stats.layers].index("q_proj")].calls[0]
    g = stats.call_gradients[("grad", 1)][id(call)][0]  # [1, N, L, d]
    (total,) = torch.autograd.grad(loss, call.outputs[0])
    torch.testing.assert_close(g.sum((0, 1)), total)


def test_from_backward_matches_oracle():
    """Statistics read from the ordinary backward pass: the shared outputs' per-sample pass runs
    when that backward starts (the graph is still whole)."""
    model, X, y, loss_fn = case_shared_axis(0, num_samples=3, T=3)
    ref = reference(model, loss_fn, X, y)
    with bg.capture(model, loss_fn, bg.BatchL2(), bg.BatchGrad(), from_backward=True) as session:
        loss = loss_fn(model(X), y)
        (2.0 * loss).backward()
    res = session.compute(loss)
    assert_close(res[bg.BatchGrad()], ref["BatchGrad"], "BatchGrad from backward")
    assert_close(res[bg.BatchL2()], ref["BatchL2"], "BatchL2 from backward")
    assert_close({n: p.grad / 2 for n, p in model.named_parameters()}, ref["Grad"], "grad")


def test_probe_leaves_no_trace():
    """The probe forward updates no buffer (BatchNorm running statistics) and draws no random
    numbers from the global generator."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Linear(4, 2))
    model = model.double().train()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss()
    with bg.capture(model, loss_fn, bg.KFAC(fisher_type="type-2")) as session:
        loss = loss_fn(model(X), y)
    before = [b.clone() for b in model.buffers()]
    state = torch.get_rng_state()
    session.compute(loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))
    assert torch.equal(state, torch.get_rng_state())


def test_cockpit_norm_test_matches_brute_force():
    """The Cockpit (statistics from the ordinary backward) on a model with shared layers."""
    from beyondgrad.cockpit import Cockpit

    model, X, y, loss_fn = case_shared_axis(4, num_samples=3, T=3)
    per = reference(model, loss_fn, X, y)["BatchGrad"]
    G = torch.cat([v.reshape(3, -1) for v in per.values()], 1) * 3  # individual gradients
    cockpit = Cockpit(model, loss_fn, config=["GradNorm", "NormTest"])
    with cockpit(0):
        loss = loss_fn(model(X), y)
        loss.backward()
    rec = cockpit.output()[0]
    g = G.mean(0)
    g2 = float(g @ g)
    assert rec["GradNorm"] == pytest.approx(g2**0.5, rel=1e-9)
    dev = float(((G - g) ** 2).sum())
    assert rec["NormTest"] == pytest.approx((dev / (3 * 2)) ** 0.5 / g2**0.5, rel=1e-8)


def test_probe_failure_falls_back_with_a_warning():
    """A model that cannot run on another batch size keeps the leading-axis convention."""

    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2)

        def forward(self, x):
            if x.shape[0] == 2:  # the probe's batch size
                raise ValueError("this model refuses batches of two")
            return self.lin(x)

    model = FixedBatch().double()
    X, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    ref = reference(model, nn.MSELoss(), X, y)
    with pytest.warns(RuntimeWarning, match="could not probe"):
        res = bg.compute(model, nn.MSELoss(), X, y, bg.BatchGrad())
    assert_close(res[bg.BatchGrad()], ref["BatchGrad"], "BatchGrad")


def test_a_model_that_flattens_its_batch_is_named_not_run_quadratically():
    """Logits flattened to ``[N*T, V]`` (``view(-1, V)``) do not keep the samples of the
    ``[N, T]`` input: the probe would run the same batch and every layer would look shared (a
    masked pass over ``N*T`` copies: seconds per step on a small GPT-2). Said, with the fix."""

    class Flat(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(7, 4), nn.Linear(4, 7)

        def forward(self, ids):
            return self.head(self.emb(ids)).reshape(-1, 7)

    model, loss_fn = Flat().double(), nn.CrossEntropyLoss()
    ids = torch.randint(0, 7, (2, 3))
    opt = bg.optim.KFAC(model, loss_fn)  # capture() sees no X, y to compare (bg.compute does)
    flat = r"none of its tensor arguments \[\(2, 3\)\].*flatten"
    with pytest.warns(RuntimeWarning, match=flat), pytest.raises(RuntimeError, match="sample axis"):
        with opt.capture():
            loss_fn(model(ids), ids.reshape(-1))


def test_diag_hessian_refuses_shared_layers():
    """DiagHessian's residual passes start inside the network, where a shared output's
    per-sample gradients cannot be separated: a clear refusal, not a wrong number."""

    class Positions(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1, self.wpe, self.l2 = nn.Linear(3, 4), nn.Embedding(3, 4), nn.Linear(4, 2)

        def forward(self, x):
            pos = self.wpe(torch.arange(x.shape[1]))
            return self.l2(torch.tanh(self.l1(x) + pos)).sum(1)

    model = Positions().double()
    X, y = torch.randn(3, 3, 3, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    with pytest.raises(NotImplementedError, match="without a sample axis"):
        bg.compute(model, nn.MSELoss(), X, y, bg.DiagHessian())


@pytest.mark.parametrize(("N", "T"), [(3, 4), (2, 4)])
def test_coupling_probe_doubles_as_the_sample_axis_probe(N, T, monkeypatch):
    """bg.compute runs the coupling probe (two small forwards) for per-sample quantities; its
    first run also records the sample axes, so the session runs no probe forward of its own.
    Results stay exact (the shapes come from a batch of another size, also when N == 2).
    Without per-sample quantities the session probes once per input signature; a plain
    gradient runs neither probe."""
    import importlib

    from beyondgrad.engine import samples

    compute_module = importlib.import_module("beyondgrad.engine.compute")

    runs = {"axes": 0, "coupling": 0}

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            runs[name] += 1
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(samples, "_run_probe", spy("axes", samples._run_probe))
    monkeypatch.setattr(
        compute_module, "samples_coupled", spy("coupling", compute_module.samples_coupled)
    )
    model, X, y, loss_fn = case_shared_axis(5, num_samples=N, T=T)
    ref = reference(model, loss_fn, X, y)
    res = bg.compute(model, loss_fn, X, y, bg.BatchGrad(), bg.DiagGGN())
    assert runs == {"axes": 0, "coupling": 1}
    assert_close(res[bg.BatchGrad], ref["BatchGrad"], "BatchGrad")
    assert_close(res[bg.DiagGGN], diag_ggn(ggn(model, loss_fn, X, y)), "DiagGGN")
    bg.compute(model, loss_fn, X, y, bg.Grad())
    assert runs == {"axes": 0, "coupling": 1}
    samples._CACHE.pop(model, None)
    kfac = bg.KFAC(fisher_type="type-2")
    bg.compute(model, loss_fn, X, y, kfac)
    bg.compute(model, loss_fn, X, y, kfac)
    assert runs == {"axes": 1, "coupling": 1}


class _Positions(nn.Module):
    """Position embeddings as nanoGPT (``arange(T)``) and Hugging Face (``[1, T]``) call them;
    ``leaky``: the ``[1, T, d]`` output is indexed (``p[0]``), so an expanded view would hand
    every sample the first sample's copy."""

    def __init__(self, leaky: bool = False, vocab: int = 7, d: int = 5, T: int = 4):
        super().__init__()
        self.leaky = leaky
        self.tok = nn.Embedding(vocab, d)
        self.wpe = nn.Embedding(T, d)
        self.hf_pos = nn.Embedding(T, d)
        self.mix = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1])
        hf = self.hf_pos(pos.unsqueeze(0))
        x = self.tok(idx) + self.wpe(pos) + (hf[0] if self.leaky else hf)
        return self.head(torch.tanh(self.mix(x))).transpose(1, 2)


def _positions(leaky: bool, N: int = 3, T: int = 4):
    torch.manual_seed(1)
    model = _Positions(leaky, T=T).double()
    X, y = torch.randint(0, 7, (N, T)), torch.randint(0, 7, (N, T))
    return model, X, y, nn.CrossEntropyLoss()


@pytest.mark.parametrize("leaky", [False, True])
def test_later_calls_expand_shared_outputs_exactly(leaky, monkeypatch):
    """After the first call has probed the model, shared outputs are handed to the model
    expanded along the sample axis (no masked pass), unless the expanded view would change
    what a sample reads (``leaky``); both stay exact."""
    from beyondgrad.engine import samples, session

    model, X, y, loss_fn = _positions(leaky)
    ref = reference(model, loss_fn, X, y)
    ggn_ref = ggn(model, loss_fn, X, y)
    masked = []
    original = session.shared_gradients
    monkeypatch.setattr(session, "shared_gradients", lambda *a: masked.append(1) or original(*a))
    qs = [bg.BatchGrad(), bg.BatchL2(), bg.Grad(), bg.DiagGGN(), bg.BatchDiagGGN()]
    for call in range(2):
        masked.clear()
        res = bg.compute(model, loss_fn, X, y, *qs)
        for q in qs[:3]:
            assert_close(res[q], ref[type(q).__name__], f"{type(q).__name__} call {call}")
        assert_close(res[bg.DiagGGN()], diag_ggn(ggn_ref), f"DiagGGN call {call}")
        assert_close(res[bg.BatchDiagGGN()], batch_diag_ggn(ggn_ref), f"BatchDiag {call}")
        expected_masked = call == 0 or leaky
        assert bool(masked) == expected_masked, (call, leaky)
    expansion = samples.expansion_for(model, (X,), {})
    assert set(expansion.plan) == ({"wpe"} if leaky else {"wpe", "hf_pos"})


def test_expansion_from_backward_and_kronecker_factors_match_masked_pass():
    """The expanded path (second capture) gives the ordinary-backward statistics and the
    per-sample Kronecker output factor of the masked pass (first capture)."""
    model, X, y, loss_fn = _positions(False, N=4, T=4)
    ref = reference(model, loss_fn, X, y)
    factors = []
    for _ in range(2):  # the first capture probes (masked pass), the second expands
        with bg.capture(model, loss_fn, vectors=[("exact", 0)]) as s:
            loss = loss_fn(model(X), y)
        factors.append(s.statistics(loss).kronecker("wpe", ("exact", 0)))
        with bg.capture(model, loss_fn, bg.BatchL2(), from_backward=True) as s:
            loss = loss_fn(model(X), y)
            loss.backward()
        assert_close(s.compute(loss)[bg.BatchL2()], ref["BatchL2"], "BatchL2 from backward")
        model.zero_grad()
    first, second = factors
    assert first is not None and second is not None
    torch.testing.assert_close(first.A_sum, second.A_sum)
    torch.testing.assert_close(first.B_sum, second.B_sum)
    assert first.count == second.count


def test_diag_hessian_keeps_refusing_after_expansion_is_validated():
    """Quantities that backpropagate from inside the network never get the expanded view:
    they refuse shared outputs on every call, not only the first."""
    model, X, y, loss_fn = _positions(False)
    bg.compute(model, loss_fn, X, y, bg.BatchL2())
    bg.compute(model, loss_fn, X, y, bg.BatchL2())
    for _ in range(2):
        with pytest.raises(NotImplementedError, match="without a sample axis"):
            bg.compute(model, loss_fn, X, y, bg.DiagHessian())
