"""Triton selective scan and causal conv1d vs the float64 PyTorch references: outputs and every gradient.

On a CUDA machine the tests run the compiled kernels at moderate shapes. Without CUDA they run in a
child pytest with TRITON_INTERPRET=1 (the interpreter must be switched on before any kernel module is
imported, which this process cannot promise once other test files have imported star), at small shapes.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
needs_kernels = pytest.mark.skipif(not (CUDA or INTERPRETED), reason="runs in the TRITON_INTERPRET=1 child")

# Relative L2 error allowed vs float64, by input dtype (fp32 math inside, half-precision inputs/outputs).
TOLERANCE = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
# Interpreter segments (steps between saved states) are 8 steps, CUDA segments 32: lengths below one
# segment, odd, and several segments. Channels span two channel blocks, the second one partial.
SHORT, ODD, LONG = (5, 19, 30) if not CUDA else (11, 333, 1000)
CHANNELS = 20 if not CUDA else 200


@pytest.mark.skipif(CUDA or INTERPRETED, reason="this process already runs the kernels")
def test_kernels_in_interpreter_subprocess():
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-o", "addopts=", "-p", "no:cacheprovider"],
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


ACTIVATION_PTRS = {"u_ptr", "delta_ptr", "z_ptr", "dy_ptr", "B_ptr", "C_ptr", "y_ptr", "du_ptr", "ddelta_ptr",
                   "dz_ptr", "x_ptr", "dx_ptr", "gx_ptr", "dgx_ptr"}


@pytest.mark.skipif(INTERPRETED, reason="compiles the jit functions, which the interpreter replaces")
@pytest.mark.parametrize("activations", ["*bf16", "*fp32"])
def test_kernels_compile_for_the_gpu(activations):
    """The interpreter runs code that Triton's compiler refuses (a name carried through a loop with two types):
    every kernel compiles for sm_90 on any machine, scan and conv with and without a scan order (a GPU run
    that tries them all needs long sequences in small batches for the local passes and the carry pass)."""
    import inspect

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from star.ops.triton import causal_conv1d as conv
    from star.ops.triton import layer_norm as ln
    from star.ops.triton import selective_scan as scan
    from star.ops.triton import selective_scan_parts as parts
    from star.ops.triton import swiglu
    from star.ops.triton.selective_scan_chunks import CUDA_CONFIG

    fwd, bwd = CUDA_CONFIG["fwd"], CUDA_CONFIG["bwd"]
    conv_flags = dict(K=4, STEP=-1, HAS_BIAS=True, SILU=True, SEGMENT_TILES=conv.SEGMENT_TILES, K_PAD=4)
    ln_tiles = dict(BLOCK_N=1024, ROWS=ln.ROWS, HAS_BIAS=True)
    kernels = [(parts._part_end_state_kernel, fwd), (parts._part_adjoint_kernel, bwd), (parts._part_carry_kernel, fwd),
               (scan._scan_fwd_kernel, fwd), (scan._scan_bwd_kernel, bwd),
               (conv._conv_fwd_kernel, {**conv_flags, **conv.FWD_TILES}),
               (conv._conv_bwd_kernel, {**conv_flags, **conv.BWD_TILES}),
               (swiglu._swiglu_fwd_kernel, {}), (swiglu._swiglu_bwd_kernel, {}),
               (ln._ln_fwd_kernel, ln_tiles), (ln._ln_bwd_kernel, ln_tiles)]
    for (kernel, tiles), order in ((k, o) for k in kernels for o in (False, True)):
        params = list(inspect.signature(kernel.fn).parameters)
        if order and "ORDER" not in params:
            continue
        scan_tiles = {} if "CHUNK" not in tiles else dict(
            N=16, N_PAD=16, SEG_CHUNKS=CUDA_CONFIG["SEGMENT"] // tiles["CHUNK"], HAS_D=True, HAS_Z=True, HAS_BIAS=True,
            SOFTPLUS=True, REVERSE=False, BACKWARD=False, SAVE_STATES=True, HAS_INIT=True, PRECISION="tf32")
        constexprs = {k: v for k, v in dict(**tiles, **scan_tiles, ORDER=order, BLOCK_M=swiglu.BLOCK_M,
                                            BLOCK_H=swiglu.BLOCK_H).items() if k in params and k != "num_warps"}
        signature = {p: "constexpr" if p in constexprs else "i32" if not p.endswith("_ptr") else
                     activations if p in ACTIVATION_PTRS else "*i32" if p == "order_ptr" else "*fp32"
                     for p in params}
        triton.compile(ASTSource(fn=kernel, signature=signature,
                                 constexprs={(params.index(k),): v for k, v in constexprs.items()}),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=tiles.get("num_warps", 4)))


GPU_TRITON = Path(__file__).resolve().parents[1] / ".venv" / "triton-3.6.0"  # installed by scripts/test.sh


@pytest.mark.skipif(CUDA or INTERPRETED, reason="compiles in a child process with the GPU machine's Triton")
def test_kernels_compile_with_the_gpu_machines_triton():
    """The GPU machine runs Triton 3.6, whose compiler refuses some kernels that the Triton installed here
    compiles (a backward kernel failed its layout pass): the compile test above, again with Triton 3.6."""
    if not (GPU_TRITON / "triton").is_dir():
        pytest.skip(f"{GPU_TRITON} is missing: scripts/test.sh installs Triton 3.6.0 there")
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(GPU_TRITON), str(root / "src")]))
    env.pop("TRITON_INTERPRET", None)
    version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"], env=env,
                             capture_output=True, text=True, timeout=120)
    assert version.stdout.strip() == "3.6.0", version.stdout + version.stderr
    result = subprocess.run([sys.executable, "-m", "pytest", __file__, "-k", "compile_for_the_gpu", "-o", "addopts=",
                             "-p", "no:cacheprovider", "-q"], cwd=root, env=env, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert "2 passed" in result.stdout


def _rel_err(x, ref):
    return ((x.detach().double().cpu() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def _scan_inputs(b, l, d, n, dtype, optional):
    g = torch.Generator().manual_seed(l * 1000 + d + n)
    randn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    A = -(0.1 + 3 * torch.rand(d, n, generator=g))  # mixes slow and fast decay
    # Without softplus (optional=False cases) delta is used as is: keep it positive, or the state explodes.
    delta = 0.5 * randn(b, l, d) if optional else 0.5 * torch.rand(b, l, d, generator=g)
    inputs = dict(u=randn(b, l, d), delta=delta, A=A, B=randn(b, l, n), C=randn(b, l, n))
    if optional:
        inputs.update(D=randn(d), z=randn(b, l, d), delta_bias=0.5 * randn(d) - 1.0)
    # A and the per-channel parameters stay fp32 as in the model; activations take the tested dtype.
    keep_fp32 = {"A", "D", "delta_bias"}
    return {k: v.to(DEVICE, torch.float32 if k in keep_fp32 else dtype).requires_grad_() for k, v in inputs.items()}


def _check_against_reference(fn, ref_fn, inputs, dtype, **kwargs):
    reference_inputs = {k: v.detach().double().cpu().requires_grad_() for k, v in inputs.items()}
    out = fn(**inputs, **kwargs)
    ref = ref_fn(**reference_inputs, **kwargs)
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    tol = TOLERANCE[dtype]
    assert _rel_err(out, ref) < tol
    grad_out = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(grad_out.to(DEVICE, dtype))
    ref.backward(grad_out)
    for name, x in inputs.items():
        assert x.grad is not None and x.grad.dtype == x.dtype, name
        assert _rel_err(x.grad, reference_inputs[name].grad) < tol, name


@needs_kernels
@pytest.mark.parametrize("length,reverse,dtype,optional,d_state", [
    (SHORT, False, torch.float32, True, 16),
    (ODD, True, torch.float32, True, 16),
    (LONG, False, torch.float32, False, 5),
    (ODD, False, torch.bfloat16, True, 16),
    (LONG, True, torch.float16, True, 16),
])
def test_selective_scan_matches_reference(length, reverse, dtype, optional, d_state):
    from star.ops import selective_scan
    from star.ops.triton import selective_scan_triton

    def ref(**kw):
        return selective_scan(**kw, impl="ref")

    inputs = _scan_inputs(2, length, CHANNELS, d_state, dtype, optional)
    _check_against_reference(selective_scan_triton, ref, inputs, dtype, reverse=reverse, delta_softplus=optional)


@needs_kernels
@pytest.mark.parametrize("reverse,grouped", [(False, False), (True, False), (True, True)])
def test_long_sequences_scan_in_parts_parallel_over_time(reverse, grouped):
    """Too few sequences to fill the device: each sequence runs as several parts at once (local passes, carry
    pass, fix-up), forward and backward, with the numerics of one long walk."""
    from star.ops import selective_scan
    from star.ops.triton import selective_scan_triton
    from star.ops.triton.selective_scan_chunks import _n_segments
    from star.ops.triton.selective_scan_parts import _parts

    groups = 2 if grouped else 1
    inputs = _scan_inputs(groups, LONG, CHANNELS, 16, torch.float32, optional=True)
    if grouped:
        g = torch.Generator().manual_seed(3)
        grouped = dict(A=-(0.1 + 3 * torch.rand(groups, CHANNELS, 16, generator=g)),
                       D=torch.randn(groups, CHANNELS, generator=g),
                       delta_bias=0.5 * torch.randn(groups, CHANNELS, generator=g) - 1.0)
        inputs.update({k: v.to(DEVICE).requires_grad_() for k, v in grouped.items()})
    for direction in ("fwd", "bwd"):
        parts, part_segments = _parts(inputs["u"], CHANNELS, direction)
        assert parts > 1 and (parts - 1) * part_segments < _n_segments(LONG, inputs["u"])
    _check_against_reference(selective_scan_triton, lambda **kw: selective_scan(**kw, impl="ref"), inputs,
                             torch.float32, reverse=reverse)


@needs_kernels
@pytest.mark.parametrize("reverse", [False, True])
def test_grouped_parameters_match_reference(reverse):
    """A (groups, d, n), D and delta_bias (groups, d), conv weights (groups, d, k): sequence run g of the batch
    uses parameter set g (the 4-direction mixer's one-call form)."""
    from star.ops import causal_conv1d, selective_scan
    from star.ops.triton import causal_conv1d_triton, selective_scan_triton

    groups, per_group = 3, 2 if CUDA else 1
    inputs = _scan_inputs(groups * per_group, ODD, CHANNELS, 16, torch.float32, optional=True)
    g = torch.Generator().manual_seed(7)
    grouped = dict(A=-(0.1 + 3 * torch.rand(groups, CHANNELS, 16, generator=g)),
                   D=torch.randn(groups, CHANNELS, generator=g), delta_bias=0.5 * torch.randn(groups, CHANNELS, generator=g))
    inputs.update({k: v.to(DEVICE).requires_grad_() for k, v in grouped.items()})
    _check_against_reference(selective_scan_triton, lambda **kw: selective_scan(**kw, impl="ref"), inputs,
                             torch.float32, reverse=reverse)
    conv_inputs = dict(x=inputs["u"].detach().clone().requires_grad_(),
                       weight=torch.randn(groups, CHANNELS, 4, device=DEVICE).requires_grad_(),
                       bias=torch.randn(groups, CHANNELS, device=DEVICE).requires_grad_())
    _check_against_reference(causal_conv1d_triton, lambda **kw: causal_conv1d(**kw, impl="ref"), conv_inputs,
                             torch.float32, activation="silu", reverse=reverse)


@needs_kernels
@pytest.mark.parametrize("length,reverse", [(ODD, False), (ODD, True), (LONG, True)])
def test_scan_orders_match_reference(length, reverse):
    """A scan order per parameter group (star.ops.orders): the kernels visit each sequence's rows in its group's
    order and write in place, as gather -> op -> scatter does; the long case also runs in parts."""
    from star.ops import causal_conv1d, selective_scan
    from star.ops.triton import causal_conv1d_triton, selective_scan_triton

    groups, per_group = 3, 2 if CUDA else 1
    inputs = _scan_inputs(groups * per_group, length, CHANNELS, 16, torch.float32, optional=True)
    g = torch.Generator().manual_seed(11)
    grouped = dict(A=-(0.1 + 3 * torch.rand(groups, CHANNELS, 16, generator=g)),
                   D=torch.randn(groups, CHANNELS, generator=g),
                   delta_bias=0.5 * torch.randn(groups, CHANNELS, generator=g))
    inputs.update({k: v.to(DEVICE).requires_grad_() for k, v in grouped.items()})
    order = torch.stack([torch.randperm(length, generator=g) for _ in range(groups)])
    _check_against_reference(lambda **kw: selective_scan_triton(**kw, order=order.to(DEVICE)),
                             lambda **kw: selective_scan(**kw, impl="ref", order=order), inputs, torch.float32,
                             reverse=reverse)
    conv_inputs = dict(x=inputs["u"].detach().clone().requires_grad_(),
                       weight=torch.randn(groups, CHANNELS, 4, device=DEVICE).requires_grad_(),
                       bias=torch.randn(groups, CHANNELS, device=DEVICE).requires_grad_())
    _check_against_reference(lambda **kw: causal_conv1d_triton(**kw, order=order.to(DEVICE)),
                             lambda **kw: causal_conv1d(**kw, impl="ref", order=order), conv_inputs, torch.float32,
                             activation="silu", reverse=reverse)


@needs_kernels
def test_selective_scan_reads_strided_activations():
    """u, delta and z may be views with a channel stride of 1 (the mixer's (x, z) split): same result as copies."""
    from star.ops.triton import selective_scan_triton

    inputs = {k: v.detach() for k, v in _scan_inputs(2, ODD, CHANNELS, 16, torch.float32, optional=True).items()}
    packed = torch.cat([inputs["u"], inputs["z"], inputs["delta"]], dim=-1).requires_grad_()
    u, z, delta = packed.split(CHANNELS, dim=-1)
    assert not u.is_contiguous() and u.stride(-1) == 1
    out = selective_scan_triton(**{**inputs, "u": u, "z": z, "delta": delta})
    ref_inputs = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    ref = selective_scan_triton(**ref_inputs)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad_out = torch.randn_like(out)
    out.backward(grad_out)
    ref.backward(grad_out)
    expected = torch.cat([ref_inputs["u"].grad, ref_inputs["z"].grad, ref_inputs["delta"].grad], dim=-1)
    torch.testing.assert_close(packed.grad, expected, rtol=0, atol=0)


@needs_kernels
def test_selective_scan_gradients_are_deterministic():
    from star.ops.triton import selective_scan_triton

    grads = []
    for _ in range(2):
        inputs = _scan_inputs(3 if CUDA else 1, ODD, CHANNELS, 16, torch.float32, optional=True)
        selective_scan_triton(**inputs).square().sum().backward()
        grads.append([x.grad for x in inputs.values()])
    for first, second in zip(*grads):
        assert torch.equal(first, second)


@needs_kernels
@pytest.mark.parametrize("kernel_size,reverse,activation,use_bias,dtype", [
    (4, False, "silu", True, torch.float32),
    (3, True, None, False, torch.float32),
    (4, True, "silu", True, torch.bfloat16),
    (2, False, None, True, torch.float16),
])
def test_causal_conv1d_matches_reference(kernel_size, reverse, activation, use_bias, dtype):
    from star.ops import causal_conv1d
    from star.ops.triton import causal_conv1d_triton

    def ref(**kw):
        return causal_conv1d(**kw, impl="ref")

    length = 700 if CUDA else 150  # several backward time segments on CUDA, several tiles on CPU
    g = torch.Generator().manual_seed(kernel_size)
    inputs = dict(x=torch.randn(2, length, CHANNELS + 60, generator=g),
                  weight=torch.randn(CHANNELS + 60, kernel_size, generator=g) / kernel_size)
    if use_bias:
        inputs["bias"] = torch.randn(CHANNELS + 60, generator=g)
    inputs = {k: v.to(DEVICE, dtype).requires_grad_() for k, v in inputs.items()}
    _check_against_reference(causal_conv1d_triton, ref, inputs, dtype, activation=activation, reverse=reverse)


@needs_kernels
def test_causal_conv1d_reads_strided_rows():
    """x may be a view whose rows are strided (the mixer's x half of in_proj's output): same values and gradients
    as a contiguous copy."""
    from star.ops.triton import causal_conv1d_triton

    xz = torch.randn(3, ODD, 2 * CHANNELS, device=DEVICE, requires_grad=True)
    weight = torch.randn(CHANNELS, 4, device=DEVICE)
    x = xz[..., :CHANNELS]
    copy = x.detach().contiguous().requires_grad_()
    y, y_copy = (causal_conv1d_triton(v, weight, activation="silu") for v in (x, copy))
    torch.testing.assert_close(y, y_copy, rtol=0, atol=0)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_copy.backward(grad)
    torch.testing.assert_close(xz.grad[..., :CHANNELS], copy.grad, rtol=0, atol=0)
    assert xz.grad[..., CHANNELS:].abs().sum() == 0


@needs_kernels
def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) functions and autograd registration are consistent, so torch.compile can trace."""
    from star.ops.triton import causal_conv1d, selective_scan

    inputs = _scan_inputs(1, SHORT, 8, 4, torch.float32, optional=True)
    args = [inputs[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    order = torch.randperm(SHORT, dtype=torch.int32).to(DEVICE)[None]
    for scan_order in (None, order):
        torch.library.opcheck(selective_scan._selective_scan_fwd, (*args, scan_order, True, False, True),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    x = torch.randn(1, 9, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(8, 4, device=DEVICE, requires_grad=True)
    w_groups = torch.randn(2, 8, 4, device=DEVICE, requires_grad=True)
    rows = torch.randperm(9, dtype=torch.int32).to(DEVICE)[None]
    for weight, conv_order, shared in ((w, None, False), (w, rows, False), (w_groups, None, True)):
        torch.library.opcheck(causal_conv1d._causal_conv1d_fwd, (x, weight, None, "silu", False, conv_order, shared),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    from star.ops.triton import swiglu
    torch.library.opcheck(swiglu._swiglu_fwd, (torch.randn(2, 3, 16, device=DEVICE, requires_grad=True),),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    from star.ops.triton import layer_norm
    norm_args = [torch.randn(*shape, device=DEVICE, requires_grad=True) for shape in ((2, 3, 24), (24,), (24,))]
    for bias, out_dtype in ((norm_args[2], torch.bfloat16), (None, torch.float32)):
        torch.library.opcheck(layer_norm._layer_norm_fwd, (norm_args[0], norm_args[1], bias, 1e-5, out_dtype),
                              test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


@needs_kernels
def test_scan_and_conv_compile_without_graph_breaks():
    from star.ops.triton import causal_conv1d_triton, selective_scan_triton

    def mixer(x, weight, **scan_inputs):
        return selective_scan_triton(causal_conv1d_triton(x, weight, activation="silu"), **scan_inputs)

    inputs = _scan_inputs(2, ODD, CHANNELS, 16, torch.float32, optional=True)
    x = inputs.pop("u")
    weight = torch.randn(CHANNELS, 4, device=DEVICE, requires_grad=True)
    compiled = torch.compile(mixer, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    out = compiled(x, weight, **inputs)
    torch.testing.assert_close(out, mixer(x, weight, **inputs), rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


@needs_kernels
def test_bad_inputs_raise_value_errors():
    from star.ops.triton import causal_conv1d_triton, selective_scan_triton

    inputs = {k: v.detach() for k, v in _scan_inputs(1, SHORT, 8, 4, torch.float32, optional=False).items()}
    with pytest.raises(ValueError, match=r"B must be \(batch, length, d_state\)"):
        selective_scan_triton(**{**inputs, "B": inputs["B"][:, :-1]})
    with pytest.raises(ValueError, match="u must be"):
        selective_scan_triton(**{**inputs, "u": inputs["u"][0]})
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_triton(inputs["u"], torch.randn(8, 4, device=DEVICE), activation="relu")
    with pytest.raises(ValueError, match="kernel_size"):
        causal_conv1d_triton(inputs["u"], torch.randn(8, 40, device=DEVICE))
    from star.ops.triton import swiglu_triton
    with pytest.raises(ValueError, match=r"\(\.\.\., 2 \* hidden\)"):
        swiglu_triton(torch.randn(2, 5, device=DEVICE))
    from star.ops.triton import layer_norm_triton
    with pytest.raises(ValueError, match=r"weight must be \(d\) = \(8,\), got \(7,\)"):
        layer_norm_triton(torch.randn(2, 8, device=DEVICE), torch.ones(7, device=DEVICE))


@needs_kernels
def test_inputs_are_checked_once_on_every_path(monkeypatch):
    """star.ops' entry points check before they dispatch, the Triton ones when called directly: once a call."""
    import importlib

    from star.ops import causal_conv1d, selective_scan
    from star.ops.triton import causal_conv1d_triton, selective_scan_triton

    calls = []

    def counted(check):
        def wrapper(*args, **kwargs):
            calls.append(check.__name__)
            return check(*args, **kwargs)
        return wrapper

    for op, check in (("selective_scan", "check_scan_inputs"), ("causal_conv1d", "check_conv_inputs")):
        wrapper = counted(getattr(importlib.import_module(f"star.ops.{op}"), check))
        for module in (f"star.ops.{op}", f"star.ops.triton.{op}"):
            monkeypatch.setattr(importlib.import_module(module), check, wrapper)
    inputs = {k: v.detach() for k, v in _scan_inputs(1, SHORT, 8, 4, torch.float32, optional=True).items()}
    weight = torch.randn(8, 4, device=DEVICE)
    for call, check in ((lambda: selective_scan(**inputs, impl="triton"), "check_scan_inputs"),
                        (lambda: selective_scan_triton(**inputs), "check_scan_inputs"),
                        (lambda: causal_conv1d(inputs["u"], weight, impl="triton"), "check_conv_inputs"),
                        (lambda: causal_conv1d_triton(inputs["u"], weight), "check_conv_inputs")):
        calls.clear()
        call()
        assert calls == [check]


@needs_kernels
@pytest.mark.parametrize("name, recompute", [("pretrain", "none"), ("classifier", "none"), ("pretrain", "mixer"),
                                             ("classifier", "mixer")])
def test_models_compile_fullgraph_and_match_eager(name, recompute):
    """Whole models with the Triton ops trace into one graph (torch.compile fullgraph; inductor on CUDA,
    aot_eager under the CPU interpreter) and a training step matches eager: loss and every gradient; also with
    the mixer's scan inputs recomputed (star.ops.triton.mixer_scan)."""
    from star.models import StarPretrain, VisionMambaClassifier

    torch.manual_seed(0)
    # small: under the interpreter every kernel runs element by element in Python
    common = dict(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, scan_impl="triton", recompute=recompute)
    if name == "pretrain":
        model = StarPretrain(**common, cluster_size=1, num_images=2, decoder_dim=16, decoder_num_heads=2,
                             decoder_depth=1)
        images = torch.randn(2, 2, 1, 8, 8)
        loss_fn = lambda m: m(images.to(DEVICE))["loss"]  # noqa: E731
    else:
        model = VisionMambaClassifier(**common, num_classes=5)
        images, labels = torch.randn(2, 1, 8, 8), torch.tensor([0, 3])
        loss_fn = lambda m: torch.nn.functional.cross_entropy(m(images.to(DEVICE)), labels.to(DEVICE))  # noqa: E731
    model = model.to(DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="inductor" if CUDA else "aot_eager")
    losses, grads = [], []
    for m in (model, compiled):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(m)
        loss.backward()
        losses.append(loss.detach())
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-5)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-3, atol=1e-5, msg=k)


def _star_ops():
    """A dispatch mode that records the star ops run while it is on (`names`) and the scan states their forwards
    keep (`states`, in elements)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class StarOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names, self.states = [], 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.name().startswith("star::"):
                self.names.append(func.name())
            if func.name() == "star::selective_scan_fwd":
                self.states += out[1].numel()
            return out

    return StarOps()


@needs_kernels
def test_compiled_blocks_leave_the_norm_and_the_gate_to_inductor():
    """Under torch.compile a block's norms and SwiGLU gate trace as their PyTorch forms, for inductor to fuse with
    the residual adds and casts, and the mixer keeps its kernels; eager runs every kernel."""
    import torch.fx

    from star.models.mamba import MambaMLPBlock

    def ops_in(gm):  # the graph's calls, also inside the subgraphs of higher-order ops (the autograd function)
        return {str(node.target) for m in gm.modules() if isinstance(m, torch.fx.GraphModule)
                for node in m.graph.nodes if node.op == "call_function"}

    traced = []

    def recording(gm, example_inputs):
        traced.append(ops_in(gm))
        return gm.forward

    block = MambaMLPBlock(16, scan_impl="triton").to(DEVICE)
    x = torch.randn(2, 5, 16, device=DEVICE)
    compiled_out = torch.compile(block, backend=recording, fullgraph=True)(x)
    (ops,) = traced
    assert not [op for op in ops if "layer_norm_fwd" in op or "swiglu" in op], sorted(ops)
    assert any("selective_scan_fwd" in op for op in ops) and any("causal_conv1d_fwd" in op for op in ops), sorted(ops)
    with _star_ops() as seen:
        eager_out = block(x)
    assert {"star::layer_norm_fwd", "star::swiglu_fwd", "star::selective_scan_fwd"} <= set(seen.names)
    torch.testing.assert_close(compiled_out, eager_out, rtol=1e-5, atol=1e-6)


@needs_kernels
def test_four_direction_mixer_kernels_match_the_gathered_path():
    """The 4-direction mixer on the kernels (scan orders read in place) equals the mixer on the PyTorch forms
    (inputs gathered into scan order once, output scattered back): output and every gradient, float32."""
    from star.models.mamba import MambaMixer, scan_orders

    torch.manual_seed(0)
    side = 3
    grid = torch.arange(side * side).view(side, side)
    rows, cols = grid.flatten(), grid.t().flatten()
    orders = scan_orders([rows, rows.flip(0), cols, cols.flip(0)]).to(DEVICE)
    mixer = MambaMixer(CHANNELS, num_directions=4, scan_impl="triton").to(DEVICE)
    x = torch.randn(2, side * side, CHANNELS, device=DEVICE, requires_grad=True)
    results = []
    for impl in ("triton", "chunked"):
        mixer.scan_impl = impl
        mixer.zero_grad(set_to_none=True)
        x.grad = None
        out = mixer(x, orders)
        out.square().sum().backward()
        results.append((out.detach(), x.grad.clone(), {k: p.grad.clone() for k, p in mixer.named_parameters()}))
    (out, dx, grads), (ref, ref_dx, ref_grads) = results
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx, ref_dx, rtol=1e-4, atol=1e-5)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-3, atol=1e-5, msg=k)


def _composed_mixer_scan(x, z, params, dt_rank, order=None, shared=False, recompute=False):
    """star.ops.triton.mixer_scan as autograd composes it from the directions' parameters and the separate Triton
    ops (`recompute` aside)."""
    from star.ops import causal_conv1d, selective_scan
    from star.ops.groups import stack_directions

    conv_weight, conv_bias, x_proj_weight, dt_proj_weight, A_log, D, delta_bias = stack_directions(params)
    A = -torch.exp(A_log)
    u = causal_conv1d(x, conv_weight, conv_bias, activation="silu", impl="triton", order=order, shared=shared)
    n, l, d = u.shape
    dt_bc = torch.bmm(u.reshape(x_proj_weight.shape[0], -1, d), x_proj_weight.transpose(1, 2))
    n_state = (dt_bc.shape[-1] - dt_rank) // 2
    dt, B, C = dt_bc.split([dt_rank, n_state, n_state], dim=-1)
    delta = torch.bmm(dt, dt_proj_weight.transpose(1, 2))
    return selective_scan(u, delta.reshape(n, l, d), A, B.reshape(n, l, -1), C.reshape(n, l, -1), D, z=z,
                          delta_bias=delta_bias, delta_softplus=True, impl="triton", order=order)


@needs_kernels
@pytest.mark.filterwarnings("ignore:A saved_tensors_hooks context")  # the test counts what autograd keeps
@pytest.mark.parametrize("num_directions", [1, 4])
@pytest.mark.parametrize("autocast", [False, True])
def test_mixer_scan_equals_the_composed_ops_and_recompute_reruns_the_scan_inputs_but_not_the_scan(
        num_directions, autocast, monkeypatch):
    """The mixer on the kernels runs conv, projections and scan as one autograd function (star.ops.triton.mixer_scan):
    output and every gradient equal those of the separate ops composed by autograd, exactly (float32, and bf16
    autocast). With recompute="mixer" its backward reruns the conv and the projections but not the scan's forward,
    with the same gradients, and keeps less. Both compile without a graph break."""
    import star.models.mamba as mamba
    from star.models.mamba import MambaMixer, scan_orders

    torch.manual_seed(0)
    side = 3
    grid = torch.arange(side * side).view(side, side)
    rows, cols = grid.flatten(), grid.t().flatten()
    orders = scan_orders([rows, rows.flip(0), cols, cols.flip(0)][:num_directions]).to(DEVICE)
    orders = orders if num_directions > 1 else None
    mixer = MambaMixer(CHANNELS, num_directions=num_directions, scan_impl="triton").to(DEVICE)
    x = torch.randn(2, side * side, CHANNELS, device=DEVICE, requires_grad=True)
    results = {}
    b, l = x.shape[:2]

    def activation(t):  # a saved tensor with a token axis (the parameters' and the scan states' have none)
        return {l, b * l, num_directions * b * l} & set(t.shape)

    for mode in ("composed", "none", "mixer"):
        mixer.recompute_scan = mode == "mixer"
        with monkeypatch.context() as patch:
            if mode == "composed":
                patch.setattr(mamba, "load_triton_op", lambda name: _composed_mixer_scan)
            kept = []
            with torch.autograd.graph.saved_tensors_hooks(
                    lambda t: kept.append(t.numel() * t.element_size() if activation(t) else 0) or t, lambda t: t), \
                    torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
                out = mixer(x, orders)
            assert out.dtype == (torch.bfloat16 if autocast else torch.float32)
            with _star_ops() as backward_ops:
                grads = torch.autograd.grad(out.float().square().sum(), [x, *mixer.parameters()])
        results[mode] = out.detach(), grads, sum(kept), backward_ops.names
    out_c, grads_c, kept_c, _ = results["composed"]
    (out, grads, kept, ops), (out_r, grads_r, kept_r, ops_r) = results["none"], results["mixer"]
    for o, g in ((out, grads), (out_r, grads_r)):
        assert torch.equal(o, out_c)
        for g, g_c in zip(g, grads_c):
            assert torch.equal(g, g_c)
    assert "star::causal_conv1d_fwd" not in ops and "star::causal_conv1d_fwd" in ops_r  # the conv is rerun
    assert "star::selective_scan_fwd" not in ops_r and "star::selective_scan_bwd" in ops_r  # the scan is not
    assert kept <= kept_c, (kept, kept_c)  # none keeps x, z, u, [dt | B | C] and delta, as the composed ops do
    assert kept_r < 0.6 * kept, (kept_r, kept)  # mixer: x, z and the projections' inputs; not u, delta, B, C
    mixer.recompute_scan = False
    with torch.no_grad(), torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast), _star_ops() as no_grad_ops:
        assert torch.equal(mixer(x, orders), out)
    assert no_grad_ops.names == ["star::causal_conv1d_fwd", "star::selective_scan_fwd"]
    assert no_grad_ops.states == 0  # no backward to prepare: the scan keeps no segment states

    def step(x):
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            return mixer(x, orders).float().square().sum()

    for recompute in (False, True):
        mixer.recompute_scan = recompute
        torch._dynamo.reset()
        explained = torch._dynamo.explain(step)(x)
        assert explained.graph_break_count == 0, (recompute, explained.break_reasons)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_matches_reference(dtype):
    """The packed SwiGLU gate silu(g) * v: value and gradient against float64, rows and channels with ragged
    last tiles."""
    from star.ops import swiglu
    from star.ops.triton import swiglu_triton

    gx = torch.randn(3, 7, 2 * (CHANNELS + 300), generator=torch.Generator().manual_seed(5))
    _check_against_reference(swiglu_triton, lambda **kw: swiglu(**kw, impl="ref"),
                             dict(gx=gx.to(DEVICE, dtype).requires_grad_()), dtype)


@needs_kernels
@pytest.mark.parametrize("x_dtype,out_dtype,bias", [(torch.float32, torch.float32, True),
                                                    (torch.float32, torch.bfloat16, True),
                                                    (torch.bfloat16, torch.bfloat16, False)])
def test_layer_norm_matches_reference(x_dtype, out_dtype, bias):
    """The norm with its output in another dtype (a block's fp32 residual in, bf16 out): value and the x,
    weight and bias gradients against float64, rows spanning two backward programs, a row not a power of two."""
    from star.ops import layer_norm
    from star.ops.triton import layer_norm_triton
    from star.ops.triton.layer_norm import ROWS

    g = torch.Generator().manual_seed(11)
    d = CHANNELS + 300
    inputs = dict(x=(3 * torch.randn(3, ROWS // 3 + 5, d, generator=g) + 1).to(x_dtype),  # off-centre
                  weight=torch.randn(d, generator=g), bias=torch.randn(d, generator=g) if bias else None)
    inputs = {k: v.to(DEVICE).requires_grad_() for k, v in inputs.items() if v is not None}
    _check_against_reference(layer_norm_triton, lambda out_dtype, **kw: layer_norm(**kw, impl="ref"), inputs,
                             out_dtype, out_dtype=out_dtype)


@needs_kernels
@pytest.mark.parametrize("reverse,use_bias", [(False, False), (True, True)])
def test_shared_inputs_match_repeated_copies(reverse, use_bias):
    """A conv input and a scan gate shared by every group's run (read in place) give the outputs and gradients
    of the repeated copies, with scan orders (the 4-direction mixer's form)."""
    from star.ops import causal_conv1d, selective_scan
    from star.ops.triton import causal_conv1d_triton, selective_scan_triton

    groups, b = 2, 2
    g = torch.Generator().manual_seed(13)
    x = torch.randn(b, ODD, CHANNELS, generator=g).to(DEVICE).requires_grad_()
    weight = torch.randn(groups, CHANNELS, 4, generator=g).to(DEVICE).requires_grad_()
    bias = torch.randn(groups, CHANNELS, generator=g).to(DEVICE).requires_grad_() if use_bias else None
    order = torch.stack([torch.randperm(ODD, generator=g) for _ in range(groups)]).to(DEVICE)
    conv = dict(activation="silu", order=order, reverse=reverse, bias=bias)
    out = causal_conv1d_triton(x, weight, shared=True, **conv)
    ref = causal_conv1d(x.repeat(groups, 1, 1), weight, impl="ref", **conv)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    leaves = (x, weight) if bias is None else (x, weight, bias)
    grads = torch.autograd.grad(out.square().sum(), leaves)
    ref_grads = torch.autograd.grad(ref.square().sum(), leaves)
    for got, expected in zip(grads, ref_grads):
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)

    inputs = _scan_inputs(groups * b, ODD, CHANNELS, 16, torch.float32, optional=True)
    inputs["A"] = (-(0.1 + 3 * torch.rand(groups, CHANNELS, 16, generator=g))).to(DEVICE).requires_grad_()
    for name in ("D", "delta_bias"):
        inputs[name] = torch.randn(groups, CHANNELS, generator=g).to(DEVICE).requires_grad_()
    z = torch.randn(b, ODD, CHANNELS, generator=g).to(DEVICE).requires_grad_()
    out = selective_scan_triton(**{**inputs, "z": z}, order=order, reverse=reverse)
    ref = selective_scan(**{**inputs, "z": z.repeat(groups, 1, 1)}, order=order, reverse=reverse, impl="ref")
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    dz = torch.autograd.grad(out.square().sum(), z)[0]
    ref_dz = torch.autograd.grad(ref.square().sum(), z)[0]
    torch.testing.assert_close(dz, ref_dz, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="shared=True needs grouped weights"):
        causal_conv1d(x, weight[0], shared=True)
