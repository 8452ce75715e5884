"""Large CPU results from recycled private mappings (``beyondgrad.result_pool``).

Checked: a result at or above the threshold comes from the pool and its memory is reused once
every view of it is gone (not before); smaller ones and a switched-off pool use
``torch.empty``; the memory kept is capped; forked children do not write into the parent's
results; huge-page advice when asked; settings and environment validated; and every result
computed on pooled memory equals the float64 brute force.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import beyondgrad as bg
from beyondgrad import result_pool
from beyondgrad.forms import OuterForm

POOL = pytest.mark.skipif(not result_pool.settings()["supported"], reason="Linux only")
F32 = torch.zeros(1, dtype=torch.float32)  # explicit dtype: other tests change the default
MIB = 1 << 20


@pytest.fixture
def pool():
    """The pool with a 1 MiB threshold, emptied before and restored after the test."""
    state = result_pool._POOL
    before = (state.min_bytes, state.keep_bytes, state.advise)
    result_pool.release()
    result_pool.configure(min_mib=1, keep_mib=256, huge_pages=False)
    yield state
    state.min_bytes, state.keep_bytes, state.advise = before
    result_pool.release()


@POOL
def test_a_freed_result_is_reused_only_when_no_view_is_left(pool):
    a = result_pool.empty((3 * MIB // 4,), F32)  # 3 MiB: one 4 MiB mapping
    ptr = a.data_ptr()
    view = a[1:]
    del a
    b = result_pool.empty((3 * MIB // 4,), F32)
    assert b.data_ptr() != ptr  # the view still holds the first mapping
    del view
    assert result_pool.settings()["free_bytes"] == 4 * MIB
    c = result_pool.empty((MIB // 4, 3), F32, dtype=torch.float32)  # same size, new shape
    assert c.data_ptr() == ptr and c.shape == (MIB // 4, 3)
    assert result_pool.settings()["free_bytes"] == 0
    c.fill_(2.0)
    assert float(c.sum()) == 2.0 * 3 * MIB // 4 and b.shape == (3 * MIB // 4,)


@POOL
def test_small_results_and_a_switched_off_pool_use_torch_empty(pool):
    small = result_pool.empty((1000,), F32)
    small.resize_(5000)  # a torch.empty storage can grow; a pooled one cannot
    big = result_pool.empty((2 * MIB,), F32)
    with pytest.raises(RuntimeError):
        big.resize_(4 * MIB)
    result_pool.configure(min_mib=None)
    off = result_pool.empty((4 * MIB,), F32)
    off.resize_(5 * MIB)
    assert result_pool.settings()["min_bytes"] is None
    assert result_pool.zeros((3, 5), torch.zeros(1, dtype=torch.float64)).dtype == torch.float64


@POOL
def test_the_memory_kept_is_capped_and_released(pool):
    result_pool.configure(min_mib=1, keep_mib=6)
    xs = [result_pool.empty((MIB // 2,), F32) for _ in range(4)]  # 2 MiB each
    del xs
    assert result_pool.settings()["free_bytes"] == 6 * MIB  # the oldest one unmapped
    result_pool.configure(min_mib=1, keep_mib=2)
    assert result_pool.settings()["free_bytes"] == 2 * MIB
    assert result_pool.release() == 2 * MIB
    assert result_pool.settings()["free_bytes"] == 0


@POOL
def test_a_forked_child_does_not_write_into_the_parents_result(pool):
    t = result_pool.zeros((MIB,), F32)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write into its copy, report what it sees
        t.fill_(7.0)
        os.write(write, str(float(t[0])).encode())
        os._exit(0)
    os.waitpid(pid, 0)
    assert float(os.read(read, 64).decode()) == 7.0
    assert float(t.abs().sum()) == 0.0


def _vm_flags(address: int) -> set[str]:
    """The VmFlags of the mapping that holds ``address`` (``/proc/self/smaps``)."""
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


@POOL
def test_huge_page_advice_only_when_asked(pool):
    plain = result_pool.empty((4 * MIB,), F32)
    assert "hg" not in _vm_flags(plain.data_ptr())
    if not result_pool._huge_pages_offered():
        pytest.skip("the kernel offers no transparent huge pages")
    result_pool.configure(min_mib=1, huge_pages=True)
    advised = result_pool.empty((5 * MIB,), F32)
    assert "hg" in _vm_flags(advised.data_ptr()) and result_pool.settings()["huge_pages"]


@pytest.mark.parametrize(
    ("kwargs", "match"), [({"min_mib": 0}, "min_mib"), ({"keep_mib": -1}, "keep")]
)
def test_bad_settings_raise(pool, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bg.configure_result_pool(**kwargs)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("", 16 * MIB), ("on", 16 * MIB), ("0", None), ("off", None), ("64", 64 * MIB)],
)
def test_the_environment_sets_the_threshold(monkeypatch, raw, expected):
    monkeypatch.setenv("BEYONDGRAD_RESULT_POOL", raw)
    assert result_pool._threshold_from_environment() == expected


@pytest.mark.parametrize("raw", ["lots", "-3"])
def test_a_malformed_environment_setting_raises(monkeypatch, raw):
    monkeypatch.setenv("BEYONDGRAD_RESULT_POOL", raw)
    with pytest.raises(ValueError, match="BEYONDGRAD_RESULT_POOL"):
        result_pool._threshold_from_environment()


def test_differentiable_rows_are_not_written_into_pooled_memory(pool):
    """Rows of tensors that require grad stay differentiable (``out=`` would refuse them)."""
    A = torch.randn(4, 1, 3, dtype=torch.float64, requires_grad=True)
    G = torch.randn(4, 1, 2, dtype=torch.float64, requires_grad=True)
    rows = OuterForm(A, G, (2, 3)).batch_grad()
    (rows.pow(2).sum()).backward()
    torch.testing.assert_close(A.grad, 2 * A.detach() * G.detach().pow(2).sum(2, keepdim=True))


def test_results_on_pooled_memory_match_the_brute_force(pool):
    """Every result from the pool (threshold 1 byte), computed twice (the second time on
    recycled mappings): per-sample gradients and the exact GGN factor of a small MLP against
    torch.func in float64."""
    result_pool.configure(min_mib=1e-6)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    loss_fn = nn.CrossEntropyLoss(reduction="sum")
    params = dict(model.named_parameters())

    def loss_one(p, x, t):
        return loss_fn(torch.func.functional_call(model, p, (x[None],)), t[None])

    per_sample = torch.func.vmap(torch.func.grad(loss_one), in_dims=(None, 0, 0))(params, X, y)
    theta = torch.cat([p.detach().flatten() for p in params.values()])

    def outputs(v):
        chunks = torch.split(v, [p.numel() for p in params.values()])
        p = {n: c.view_as(params[n]) for n, c in zip(params, chunks)}
        return torch.func.functional_call(model, p, (X,))

    J = torch.func.jacrev(outputs)(theta)  # [N, C, P]
    prob = torch.softmax(model(X), 1).detach()
    H = torch.diag_embed(prob) - prob[:, :, None] * prob[:, None, :]
    ggn = torch.einsum("ncp,ncd,ndq->pq", J, H, J)
    for _ in range(2):
        res = bg.compute(model, loss_fn, X, y, bg.BatchGrad(), bg.SqrtGGN(), bg.DiagGGN())
        for name in params:
            torch.testing.assert_close(res[bg.BatchGrad()][name], per_sample[name])
        flat = torch.cat([res[bg.SqrtGGN()][n].flatten(2) for n in params], 2).flatten(0, 1)
        torch.testing.assert_close(flat.T @ flat, ggn)
        del res, flat
    assert result_pool.settings()["free_bytes"] > 0


@POOL
def test_a_result_alive_at_exit_leaves_no_error():
    """Finalizers do not run at exit: a mapping still viewed there is not given back (closing
    it would raise ``BufferError: cannot close exported pointers exist``)."""
    script = (
        "import torch\n"
        "from beyondgrad import result_pool\n"
        "result_pool.configure(min_mib=1, keep_mib=0)\n"
        "keep = result_pool.empty((1 << 20,), torch.zeros(1, dtype=torch.float32))\n"
        "keep.fill_(1.0)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0 and "Error" not in done.stderr, done.stderr


@POOL
def test_under_memory_pressure_the_pool_keeps_nothing(pool, monkeypatch):
    kept = result_pool.empty((MIB // 2,), F32)  # 2 MiB
    del kept
    assert result_pool.settings()["free_bytes"] == 2 * MIB
    monkeypatch.setattr(result_pool, "available_bytes", lambda: 0)
    other = result_pool.empty((MIB,), F32)  # a miss (4 MiB) under pressure: the rest unmapped
    assert result_pool.settings()["free_bytes"] == 0
    del other  # freed under pressure: unmapped, not kept
    assert result_pool.settings()["free_bytes"] == 0


@POOL
def test_the_vector_memory_guard_releases_the_pool_before_refusing(pool, monkeypatch):
    from beyondgrad.engine import memory

    monkeypatch.setattr(memory, "available_memory", lambda device: 1 * MIB)
    out = torch.zeros(1, 5, dtype=torch.float32)  # 2 x 5 floats per vector: 40 B
    kept = result_pool.empty((4 * MIB,), F32)  # 16 MiB kept once freed
    del kept
    memory.check_vector_memory(MIB // 4, [], out, "test")  # 10 MiB: fits once released
    assert result_pool.settings()["free_bytes"] == 0
    with pytest.raises(MemoryError, match="test"):  # 40 MiB: does not fit even then
        memory.check_vector_memory(MIB, [], out, "test")


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux only")
def test_available_memory_counts_the_page_cache_the_kernel_can_drop():
    """The memory guard reads ``MemAvailable``, not the free pages alone (on a machine whose
    page cache fills the RAM, free pages would refuse work that fits)."""
    from beyondgrad.engine import memory

    with open("/proc/meminfo") as f:
        info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
    got = memory.available_memory(torch.device("cpu"))
    assert got is not None and abs(got - info["MemAvailable"]) <= 0.05 * info["MemAvailable"]
    assert got >= info["MemFree"] - 0.05 * info["MemAvailable"]
