"""Plain-PyTorch ops: chunked scan vs the sequential reference, reverse, one-step updates, conv, errors."""
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from star.ops import causal_conv1d, causal_conv1d_update, selective_scan, selective_state_update
from star.ops.causal_conv1d import causal_conv1d_ref
from star.ops.impls import OPS, implementation, load_triton_op
from star.ops.selective_scan import selective_scan_chunked, selective_scan_ref


def make_scan_inputs(batch, length, d, n, *, seed=0, dtype=torch.float64, D=True, z=True, delta_bias=True):
    """Random inputs in the regime the model produces: A = -exp(randn) < 0, delta of either sign."""
    g = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)
    inputs = dict(u=randn(batch, length, d), delta=randn(batch, length, d) - 1.0, A=-torch.exp(randn(d, n)),
                  B=randn(batch, length, n), C=randn(batch, length, n),
                  D=randn(d) if D else None, z=randn(batch, length, d) if z else None,
                  delta_bias=0.5 * randn(d) if delta_bias else None)
    return {k: None if v is None else v.to(dtype) for k, v in inputs.items()}


def positive_delta(inputs):
    """For delta_softplus=False the step must stay >= 0 (as softplus guarantees), else the scan blows up."""
    inputs = dict(inputs, delta=inputs["delta"].abs() * 0.5)
    if inputs["delta_bias"] is not None:
        inputs["delta_bias"] = inputs["delta_bias"].abs()
    return inputs


def with_grad(inputs):
    return {k: None if v is None else v.clone().requires_grad_() for k, v in inputs.items()}


def flip_time(inputs):
    return {k: v.flip(1) if k in ("u", "delta", "B", "C", "z") and v is not None else v for k, v in inputs.items()}


def scan_and_grads(fn, inputs, **kw):
    inputs = with_grad(inputs)
    y = fn(**inputs, **kw)
    g = torch.Generator().manual_seed(123)
    weights = torch.randn(y.shape, generator=g, dtype=y.dtype)
    names = [k for k, v in inputs.items() if v is not None]
    grads = torch.autograd.grad((y * weights).sum(), [inputs[k] for k in names])
    return y, dict(zip(names, grads))


@pytest.mark.parametrize("length", [1, 7, 33, 130])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("options", [dict(), dict(D=False, z=False, delta_bias=False), dict(softplus=False)])
def test_chunked_matches_ref_outputs_and_grads(length, reverse, options):
    softplus = options.pop("softplus", True)
    inputs = make_scan_inputs(2, length, 3, 4, seed=length, **options)
    if not softplus:
        inputs = positive_delta(inputs)
    # chunk_size 16 (the default) and 5 give lengths below, at, and above one chunk, ragged last chunks included.
    y_ref, g_ref = scan_and_grads(selective_scan, inputs, delta_softplus=softplus, reverse=reverse, impl="ref")
    for chunk_size in (5, 16):
        y, g = scan_and_grads(selective_scan_chunked, inputs, delta_softplus=softplus, reverse=reverse,
                              chunk_size=chunk_size)
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        assert g.keys() == g_ref.keys()
        for name in g_ref:
            torch.testing.assert_close(g[name], g_ref[name], rtol=1e-10, atol=1e-10, msg=f"grad of {name}")


def test_scan_matches_explicit_recurrence():
    """The reference against the formula written out independently, including the softplus threshold."""
    inputs = make_scan_inputs(2, 9, 3, 4, seed=1)
    # Just past softplus's threshold of 20, delta' = delta + bias exactly (log1p(exp(.)) is 1e-9 larger).
    inputs["delta"][0, 2] = 20.5 - inputs["delta_bias"]
    u, delta, A, B, C, D, z, bias = (inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias"))
    pre = delta + bias
    dt = torch.where(pre > 20, pre, torch.log1p(torch.exp(pre)))
    h = torch.zeros(2, 3, 4, dtype=torch.float64)
    ys = []
    for t in range(9):
        for b in range(2):
            for c in range(3):
                h[b, c] = torch.exp(dt[b, t, c] * A[c]) * h[b, c] + dt[b, t, c] * B[b, t] * u[b, t, c]
        ys.append((h * C[:, t, None, :]).sum(-1))
    expected = (torch.stack(ys, 1) + D * u) * z * torch.sigmoid(z)
    for impl in ("ref", "chunked"):
        torch.testing.assert_close(selective_scan(**inputs, impl=impl), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("fn", [selective_scan_ref, selective_scan_chunked])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_gradcheck(fn, reverse):
    inputs = with_grad(make_scan_inputs(1, 5, 2, 3, seed=7))
    kw = dict(chunk_size=2) if fn is selective_scan_chunked else {}
    names = list(inputs)
    func = lambda *args: fn(**dict(zip(names, args)), reverse=reverse, **kw)
    assert torch.autograd.gradcheck(func, tuple(inputs.values()))


@pytest.mark.parametrize("impl", ["ref", "chunked"])
def test_reverse_equals_flipped_forward(impl):
    inputs = make_scan_inputs(2, 21, 3, 4, seed=3)
    y_rev = selective_scan(**inputs, reverse=True, impl=impl)
    y_flip = selective_scan(**flip_time(inputs), reverse=False, impl=impl).flip(1)
    torch.testing.assert_close(y_rev, y_flip, rtol=1e-12, atol=1e-12)
    assert not torch.allclose(y_rev, selective_scan(**inputs, impl=impl))  # direction actually matters


def test_state_update_steps_reproduce_scan():
    inputs = make_scan_inputs(2, 13, 3, 4, seed=5)
    y_scan = selective_scan(**inputs, impl="chunked")
    state = torch.zeros(2, 3, 4, dtype=torch.float64)
    ys = []
    for t in range(13):
        step = {k: inputs[k][:, t] for k in ("u", "delta", "B", "C", "z")}
        before = state.clone()
        y_t, new_state = selective_state_update(state, **step, A=inputs["A"], D=inputs["D"],
                                                delta_bias=inputs["delta_bias"])
        assert torch.equal(state, before)  # functional: the input state is untouched
        state = new_state
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y_scan, rtol=1e-12, atol=1e-12)


def test_state_update_float32_state_with_bf16_inputs():
    inputs = make_scan_inputs(2, 1, 3, 4, seed=6)
    step = {k: inputs[k][:, 0].bfloat16() for k in ("u", "delta", "B", "C", "z")}
    y, state = selective_state_update(torch.zeros(2, 3, 4), **step, A=inputs["A"].float(), D=inputs["D"].float())
    assert y.dtype == torch.bfloat16 and state.dtype == torch.float32
    with pytest.raises(ValueError, match="state must be float32 or float64"):
        selective_state_update(torch.zeros(2, 3, 4, dtype=torch.bfloat16), **step, A=inputs["A"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["ref", "chunked"])
def test_scan_low_precision_dtypes(dtype, impl):
    inputs = make_scan_inputs(2, 40, 8, 16, seed=9)
    low = {k: v.to(dtype) if k != "A" else v.float() for k, v in inputs.items()}
    y = selective_scan(**low, impl=impl)
    assert y.dtype == dtype and y.shape == (2, 40, 8)
    # Same inputs, rounded to `dtype`, scanned in float64: only the output rounding and fp32 math differ.
    expected = selective_scan(**{k: v.double() for k, v in low.items()}, impl="ref")
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.double(), expected, **tol)


def test_scan_keeps_fp32_under_bf16_autocast():
    inputs = {k: v.float() for k, v in make_scan_inputs(2, 30, 8, 16, seed=10).items()}
    expected = selective_scan(**inputs, impl="ref")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for impl in ("ref", "chunked"):
            y = selective_scan(**inputs, impl=impl)
            assert y.dtype == torch.float32
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)


def test_scan_bad_inputs_raise_value_error():
    inputs = make_scan_inputs(2, 7, 3, 16, seed=0)
    bad = dict(inputs, B=inputs["B"][..., :8])
    with pytest.raises(ValueError, match=r"B must be \(batch, length, d_state\) = \(2, 7, 16\), got \(2, 7, 8\)"):
        selective_scan(**bad)
    with pytest.raises(ValueError, match=r"D must be \(d\) = \(3,\)"):
        selective_scan(**dict(inputs, D=torch.ones(4, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"z must be"):
        selective_scan(**dict(inputs, z=inputs["z"][:, :3]))
    with pytest.raises(ValueError, match=r"A must be"):
        selective_scan(**dict(inputs, A=inputs["A"][0]))
    with pytest.raises(ValueError, match=r"u must be a \(batch, length, d\) tensor"):
        selective_scan(**dict(inputs, u=inputs["u"][0]))
    with pytest.raises(ValueError, match=r"u must have at least one time step"):
        selective_scan(**{k: v[:, :0] if v is not None and v.dim() == 3 else v for k, v in inputs.items()})
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'ref', 'chunked', 'triton'\)"):
        selective_scan(**inputs, impl="cuda")
    with pytest.raises(ValueError, match=r"B must be \(batch, d_state\)"):
        selective_state_update(torch.zeros(2, 3, 16), **{k: inputs[k][:, 0] for k in ("u", "delta", "C")},
                               A=inputs["A"], B=inputs["B"][:, 0, :8])


def test_triton_unavailable_raises_clear_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "star.ops.triton", None)  # makes the import fail
    load_triton_op.cache_clear()
    try:
        inputs = {k: v.float() if isinstance(v, torch.Tensor) else v for k, v in make_scan_inputs(1, 3, 2, 4).items()}
        with pytest.raises(RuntimeError, match="impl='triton' needs the Triton kernels"):
            selective_scan(**inputs, impl="triton")
        with pytest.raises(RuntimeError, match="impl='triton' needs the Triton kernels"):
            causal_conv1d(inputs["u"], torch.ones(2, 4), impl="triton")
        torch.testing.assert_close(selective_scan(**inputs, impl="auto"), selective_scan(**inputs, impl="ref"))
    finally:
        load_triton_op.cache_clear()


def test_empty_sequences_are_refused_by_every_op():
    inputs = make_scan_inputs(2, 0, 3, 4)
    with pytest.raises(ValueError, match="length 0"):
        selective_scan(**inputs, impl="ref")
    with pytest.raises(ValueError, match="length 0"):
        causal_conv1d(inputs["u"], torch.ones(3, 4, dtype=torch.float64), impl="ref")


def test_float64_never_goes_to_the_float32_kernels():
    inputs = make_scan_inputs(1, 3, 2, 4)  # float64
    with pytest.raises(ValueError, match="computes in float32"):
        selective_scan(**inputs, impl="triton")
    with pytest.raises(ValueError, match="computes in float32"):
        causal_conv1d(inputs["u"], torch.ones(2, 4, dtype=torch.float64), impl="triton")
    # "auto" keeps float64 exact where it would pick Triton: on CUDA (implementation reads only dtype and is_cuda)
    on_cuda = lambda dtype: SimpleNamespace(dtype=dtype, is_cuda=True)  # noqa: E731
    assert implementation("selective_scan", "auto", on_cuda(torch.float64)) is selective_scan_chunked
    assert implementation("causal_conv1d", "auto", on_cuda(torch.float64)) is causal_conv1d_ref
    assert implementation("selective_scan", "auto", on_cuda(torch.float32)) is load_triton_op(OPS["selective_scan"]["triton"])


def test_op_table_has_every_implementation_of_every_op():
    """One row per op, one column per impl name: the mixer passes its one scan_impl to every op."""
    cpu = SimpleNamespace(dtype=torch.float32, is_cuda=False)
    assert set(OPS) == {"selective_scan", "causal_conv1d", "swiglu", "layer_norm"}
    for op, row in OPS.items():
        assert set(row) == {"ref", "chunked", "triton"}, op
        assert implementation(op, "ref", cpu) is row["ref"] and implementation(op, "auto", cpu) is row["chunked"]
    with pytest.raises(ValueError, match="is on meta but the sequences are on cpu"):
        selective_scan(**{**make_scan_inputs(1, 3, 2, 4), "B": torch.empty(1, 3, 4, dtype=torch.float64,
                                                                             device="meta")})


def conv_loop(x, weight, bias, activation, reverse):
    """y[t] = bias + sum_j w[j] x[t - (k-1) + j] (or its mirror, x[t + (k-1) - j]), zeros outside."""
    batch, length, d = x.shape
    k = weight.shape[1]
    y = torch.zeros_like(x) + (0 if bias is None else bias)
    for t in range(length):
        for j in range(k):
            s = t + (k - 1) - j if reverse else t - (k - 1) + j
            if 0 <= s < length:
                y[:, t] = y[:, t] + weight[:, j] * x[:, s]
    return F.silu(y) if activation == "silu" else y


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("k", [1, 4])
def test_conv_matches_loop_with_grads(reverse, activation, k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, k, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    y = causal_conv1d(x, weight, bias, activation=activation, reverse=reverse, impl="ref")
    assert_same_outputs_and_grads(y, conv_loop(x, weight, bias, activation, reverse),
                                  dict(x=x, weight=weight, bias=bias))


def assert_same_outputs_and_grads(y, y_ref, leaves, tol=1e-12):
    """y equals y_ref, and so do the gradients of a random weighting of them w.r.t. every leaf."""
    torch.testing.assert_close(y, y_ref, rtol=tol, atol=tol)
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(9), dtype=y.dtype)
    grads = torch.autograd.grad((y * w).sum(), list(leaves.values()), retain_graph=True)
    grads_ref = torch.autograd.grad((y_ref * w).sum(), list(leaves.values()), retain_graph=True)
    for name, a, b in zip(leaves, grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"grad of {name}")


def test_conv_reverse_equals_flipped_forward_and_is_causal():
    g = torch.Generator().manual_seed(0)
    x, weight, bias = torch.randn(2, 11, 3, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    y_rev = causal_conv1d(x, weight, bias, activation="silu", reverse=True)
    torch.testing.assert_close(y_rev, causal_conv1d(x.flip(1), weight, bias, activation="silu").flip(1))
    x2 = x.clone()
    x2[:, 6:] += 1.0  # a change at t >= 6 must not move causal outputs before 6, nor anti-causal ones after 5
    torch.testing.assert_close(causal_conv1d(x2, weight, bias)[:, :6], causal_conv1d(x, weight, bias)[:, :6])
    x3 = x.clone()
    x3[:, :6] += 1.0
    torch.testing.assert_close(causal_conv1d(x3, weight, bias, reverse=True)[:, 6:],
                               causal_conv1d(x, weight, bias, reverse=True)[:, 6:])


def test_conv_update_steps_reproduce_conv():
    g = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(2, 10, 3, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    y_full = causal_conv1d(x, weight, bias, activation="silu")
    state = torch.zeros(2, 3, 3)
    ys = []
    for t in range(10):
        before = state.clone()
        y_t, new_state = causal_conv1d_update(state, x[:, t], weight, bias, activation="silu")
        assert torch.equal(state, before)
        torch.testing.assert_close(new_state[..., -1], x[:, t])  # newest input goes last
        state = new_state
        ys.append(y_t)
    torch.testing.assert_close(torch.stack(ys, 1), y_full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_dtypes(dtype):
    g = torch.Generator().manual_seed(2)
    x, weight, bias = torch.randn(2, 10, 3, generator=g), torch.randn(3, 4, generator=g), torch.randn(3, generator=g)
    y = causal_conv1d(x.to(dtype), weight, bias, activation="silu")  # float32 weights, as nn.Conv1d holds them
    assert y.dtype == dtype
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else {}
    torch.testing.assert_close(y.float(), conv_loop(x.to(dtype).float(), weight, bias, "silu", False), **tol)


def test_conv_bad_inputs_raise_value_error():
    x, weight = torch.randn(2, 10, 3), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"weight must be \(d, k\) = \(3, 4\)|weight must be a \(d, k\) tensor"):
        causal_conv1d(x, torch.randn(5, 4))
    with pytest.raises(ValueError, match=r"bias must be \(d\) = \(3,\), got \(4,\)"):
        causal_conv1d(x, weight, torch.randn(4))
    with pytest.raises(ValueError, match=r"activation must be one of \(None, 'silu'\), got 'relu'"):
        causal_conv1d(x, weight, activation="relu")
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'ref', 'chunked', 'triton'\), got 'cuda'"):
        causal_conv1d(x, weight, impl="cuda")
    torch.testing.assert_close(causal_conv1d(x, weight, impl="chunked"), causal_conv1d(x, weight, impl="ref"))
    with pytest.raises(ValueError, match=r"conv_state must be \(batch, d, k_minus_1\) = \(2, 3, 3\), got \(2, 3, 4\)"):
        causal_conv1d_update(torch.zeros(2, 3, 4), x[:, 0], weight)


def grouped_inputs(groups, per_group, length, d, n, seed=0):
    """Scan inputs whose A, D and delta_bias carry one parameter set per group of sequences."""
    inputs = make_scan_inputs(groups * per_group, length, d, n, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return dict(inputs, A=-torch.exp(torch.randn(groups, d, n, generator=g, dtype=torch.float64)),
                D=torch.randn(groups, d, generator=g, dtype=torch.float64),
                delta_bias=0.5 * torch.randn(groups, d, generator=g, dtype=torch.float64))


def group_slice(inputs, g, per_group):
    rows = slice(g * per_group, (g + 1) * per_group)
    return {k: v[g] if k in ("A", "D", "delta_bias") else v[rows] for k, v in inputs.items()}


@pytest.mark.parametrize("impl", ["ref", "chunked"])
@pytest.mark.parametrize("reverse", [False, True])
def test_grouped_scan_equals_one_call_per_group(impl, reverse):
    leaves = with_grad(grouped_inputs(3, 2, 21, 5, 4))
    y = selective_scan(**leaves, impl=impl, reverse=reverse)
    loop = torch.cat([selective_scan(**group_slice(leaves, g, 2), impl="ref", reverse=reverse) for g in range(3)])
    assert_same_outputs_and_grads(y, loop, leaves, tol=1e-10)


def test_grouped_conv_equals_one_call_per_group():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(3, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    for reverse in (False, True):
        y = causal_conv1d(x, weight, bias, activation="silu", reverse=reverse)
        loop = torch.cat([conv_loop(x[2 * i:2 * i + 2], weight[i], bias[i], "silu", reverse) for i in range(3)])
        assert_same_outputs_and_grads(y, loop, dict(x=x, weight=weight, bias=bias))


def test_grouped_parameters_bad_shapes_raise_value_error():
    inputs = grouped_inputs(3, 2, 5, 4, 2)
    with pytest.raises(ValueError, match=r"batch=4 must be a multiple of the 3 parameter groups"):
        selective_scan(**{k: v[:4] if k in ("u", "delta", "B", "C", "z") else v for k, v in inputs.items()})
    with pytest.raises(ValueError, match=r"D must be \(groups, d\) = \(3, 4\), got \(4,\)"):
        selective_scan(**dict(inputs, D=inputs["D"][0]))
    with pytest.raises(ValueError, match=r"batch=5 must be a multiple of the 2 weight groups"):
        causal_conv1d(torch.randn(5, 7, 3), torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match=r"bias must be \(groups, d\) = \(2, 3\), got \(3,\)"):
        causal_conv1d(torch.randn(4, 7, 3), torch.randn(2, 3, 4), torch.randn(3))


@pytest.mark.parametrize("impl", ["ref", "chunked"])
def test_scan_orders_visit_rows_in_order_and_write_in_place(impl):
    """order[g] lists the rows a sequence of group g visits: each sequence scanned on its own after indexing its
    rows by the order gives the same outputs, put back at those rows; the conv likewise."""
    from star.ops import causal_conv1d, selective_scan

    torch.manual_seed(0)
    groups, per_group, length, d, n = 2, 2, 9, 3, 4
    batch = groups * per_group
    order = torch.stack([torch.randperm(length) for _ in range(groups)])
    u, delta, z = (torch.randn(batch, length, d, dtype=torch.float64) for _ in range(3))
    B, C = (torch.randn(batch, length, n, dtype=torch.float64) for _ in range(2))
    A = -torch.rand(groups, d, n, dtype=torch.float64) - 0.5
    D, bias = torch.randn(groups, d, dtype=torch.float64), torch.randn(groups, d, dtype=torch.float64)
    w, cb = torch.randn(groups, d, 4, dtype=torch.float64), torch.randn(groups, d, dtype=torch.float64)
    y = selective_scan(u, delta, A, B, C, D, z, bias, impl=impl, order=order)
    conv = causal_conv1d(u, w, cb, activation="silu", impl=impl, order=order)
    for i in range(batch):
        g, rows = i // per_group, order[i // per_group]
        one = selective_scan(u[i:i + 1, rows], delta[i:i + 1, rows], A[g], B[i:i + 1, rows], C[i:i + 1, rows], D[g],
                             z[i:i + 1, rows], bias[g], impl="ref")
        torch.testing.assert_close(y[i:i + 1, rows], one)
        torch.testing.assert_close(conv[i:i + 1, rows],
                                   causal_conv1d(u[i:i + 1, rows], w[g], cb[g], activation="silu", impl="ref"))
    # one (length,) order serves every sequence
    torch.testing.assert_close(selective_scan(u, delta, A, B, C, order=order[0], impl=impl),
                               selective_scan(u, delta, A, B, C, order=order[0].expand(groups, -1), impl=impl))


def test_bad_scan_orders_raise_value_errors():
    from star.ops import causal_conv1d, selective_scan

    u = torch.randn(4, 6, 3)
    args = (u, u.clone(), -torch.ones(3, 2), torch.randn(4, 6, 2), torch.randn(4, 6, 2))
    for bad, match in ((torch.arange(5), r"\(length,\) or \(groups, length\)"),
                       (torch.arange(6.0), "int32 or int64"),
                       (torch.arange(6).repeat(3, 1), "multiple of the 3 scan orders"),
                       (torch.tensor([0, 1, 2, 3, 4, 4]), "permutation")):
        with pytest.raises(ValueError, match=match):
            selective_scan(*args, order=bad)
        with pytest.raises(ValueError, match=match):
            causal_conv1d(u, torch.randn(3, 4), order=bad)
