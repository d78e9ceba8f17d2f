"""The op table: for every op, the function behind each `impl` name, and the input checks all ops share.

As mamba_ssm pairs each fast op with a `_ref` twin of the same signature, every op here registers one row,
{"ref": reference, "chunked": CPU form, "triton": name in star.ops.triton}, and `implementation(op, impl, x)`
resolves a name for a given input ("auto": Triton for CUDA tensors when it imports, else "chunked"). An op
without a chunked form lists its reference there, so one `scan_impl` choice serves every op of the mixer. A
new implementation is one more column: a name in IMPLS and an entry in each op's row.
Each op's entry point (`selective_scan`, `causal_conv1d`) checks the inputs once, before it dispatches, so the
functions in a row take them unchecked: the Triton column names `*_triton_unchecked`, and the public
`*_triton` functions, for direct calls, run the same checks and then those.
"""
from typing import Callable, Dict, Union

import torch

IMPLS = ("auto", "ref", "chunked", "triton")
OPS: Dict[str, Dict[str, Union[Callable, str]]] = {}


def register_op(name: str, ref: Callable, chunked: Callable, triton: str) -> None:
    OPS[name] = {"ref": ref, "chunked": chunked, "triton": triton}


_TRITON_OPS: dict = {}


def load_triton_op(name: str):
    """Return `star.ops.triton.<name>`, or the ImportError that prevents it (cached: tried once). A dict
    cache and a plain import statement, which torch.compile traces, so the models compile in one graph."""
    if name not in _TRITON_OPS:
        try:
            import star.ops.triton as triton_ops
            _TRITON_OPS[name] = getattr(triton_ops, name)
        except (ImportError, AttributeError) as err:
            _TRITON_OPS[name] = ImportError(f"star.ops.triton.{name} is unavailable: {err}")
    return _TRITON_OPS[name]


load_triton_op.cache_clear = _TRITON_OPS.clear  # tests: forget what was loaded


def implementation(op: str, impl: str, x: torch.Tensor) -> Callable:
    """The function of `op` that `impl` names for input `x` (only its dtype and device are read)."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    row = OPS[op]
    if x.dtype == torch.float64:  # the kernels compute in float32: keep float64 exact (gradcheck, references)
        if impl == "triton":
            raise ValueError("impl='triton' computes in float32; float64 inputs need impl='ref' or 'chunked' (or "
                             "'auto', which picks 'chunked' for them)")
        if impl == "auto":
            return row["chunked"]
    if impl == "auto":
        if not x.is_cuda or isinstance(load_triton_op(row["triton"]), ImportError):
            return row["chunked"]
        impl = "triton"
    if impl == "triton":
        fn = load_triton_op(row["triton"])
        if isinstance(fn, ImportError):
            raise RuntimeError(f"impl='triton' needs the Triton kernels, but {fn}. Use impl='ref' or 'chunked' "
                               f"instead.")
        return fn
    return row[impl]


def compiled_form(impl: str) -> str:
    """The impl a model's norm or gate runs: under torch.compile (and torch.export) their reference form, even
    where a kernel was named, so that inductor can fuse them with the residual adds and casts around them (a
    custom op stays a kernel apart; compiling gave STAR-B nothing, docs/benchmarks); the impl asked for in eager,
    or where a PyTorch form was asked for. The scan and the conv keep their kernels, which inductor cannot
    write."""
    return "ref" if impl not in ("ref", "chunked") and torch.compiler.is_compiling() else impl


def is_triton(op: str, impl: str, x: torch.Tensor) -> bool:
    """Whether `implementation(op, impl, x)` is the op's Triton kernel (not one of its PyTorch forms)."""
    return implementation(op, impl, x) not in (OPS[op]["ref"], OPS[op]["chunked"])


def check_sequences(name: str, x) -> tuple[int, int, int]:
    """(batch, length, d) of `x`, a real floating-point (batch, length, d) tensor of at least one time step."""
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        raise ValueError(f"{name} must be a (batch, length, d) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    batch, length, d = x.shape
    check_shape(name, x, batch=batch, length=length, d=d)
    if length == 0:
        raise ValueError(f"{name} must have at least one time step, got length 0")
    return batch, length, d


def check_shape(name: str, tensor: torch.Tensor, device: torch.device = None, **dims: int) -> None:
    """Raise a ValueError naming `name` unless `tensor` has exactly the named dims, e.g. batch=2, length=7
    (and, given `device`, lives there)."""
    expected = tuple(dims.values())
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a tensor of shape ({', '.join(dims)}) = {expected}, "
                         f"got {type(tensor).__name__}")
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{name} must be ({', '.join(dims)}) = {expected}, got {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ValueError(f"{name} must be a real floating-point tensor, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but the sequences are on {device}")
