"""Where one training step's time goes, by part of the model, from one torch.profiler run.

Forward hooks open a `record_function` range named after the part (mixer, MLP, decoder, ...) around every
module of that part. A kernel launched in the forward pass takes the innermost range around its launch; a
kernel of the backward pass takes the range of the forward op that made its autograd node (matched by the
profiler's sequence numbers); kernels whose names match a rule (the scan kernels) take the rule's part
wherever they run. The optimizer step runs inside a range of its own; the rest is "other".

The same step is also split by kind of kernel (matmuls, scan forward/backward, conv, norms, gathers, copies,
elementwise, ...: `KERNEL_KINDS`, by name) with its largest kernels, and `saved_by_part` sums the activations
one forward pass keeps for backward, by part: where the time and the memory go, side by side.
"""
import gc
from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn

PREFIX = "part::"
BACKWARD = "autograd::engine::evaluate_function"


def claimed_modules(model: nn.Module, parts: Sequence[Tuple[str, Callable[[str, nn.Module], bool]]]):
    """(module, part) for every module that `parts` (name, test(module name, module)) claims, the first claim."""
    for module_name, module in model.named_modules():
        part = next((name for name, claims in parts if claims(module_name, module)), None)
        if part is not None:
            yield module, part


@contextmanager
def annotated(model: nn.Module, parts: Sequence[Tuple[str, Callable[[str, nn.Module], bool]]]):
    """Open a `PREFIX + part` range around every module that `parts` claims (`claimed_modules`)."""
    handles = []
    for module, part in claimed_modules(model, parts):
        ranges = []

        def enter(_module, _args, part=part, ranges=ranges):
            ranges.append(torch.autograd.profiler.record_function(PREFIX + part).__enter__())

        def leave(_module, _args, _output, ranges=ranges):
            ranges.pop().__exit__(None, None, None)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _range_of(event) -> Optional[str]:
    while event is not None:
        if event.name.startswith(PREFIX):
            return event.name[len(PREFIX):]
        event = event.cpu_parent
    return None


def _backward_node(event) -> Optional[int]:
    """The sequence number of the autograd node whose evaluation ran `event`, or None in the forward. The node is
    the child of an evaluate_function range that is named after it (the engine's own ops, such as the sums that
    reduce a broadcast gradient, are its siblings)."""
    while event is not None:
        if event.name.startswith(BACKWARD):
            node_name = event.name.split(": ", 1)[-1]
            return next((c.sequence_nr for c in event.cpu_children if c.name == node_name), -1)
        event = event.cpu_parent
    return None


def categorize(events: Iterable, cost: Callable, kernel_rules: Dict[str, Sequence[str]]) -> Dict[str, float]:
    """Sum `cost(event)` (ms) per part. `kernel_rules`: part -> kernel-name fragments that claim a kernel."""
    events = list(events)
    forward_part = {}
    for ev in events:
        if ev.sequence_nr >= 0 and _backward_node(ev) is None:
            part = _range_of(ev)
            if part is not None:
                forward_part.setdefault(ev.sequence_nr, part)
    totals = defaultdict(float)
    for ev in events:
        for kernel_name, ms in cost(ev):
            part = next((p for p, fragments in kernel_rules.items() if any(f in kernel_name for f in fragments)), None)
            if part is None:
                node = _backward_node(ev)
                part = _range_of(ev) if node is None else forward_part.get(node)
            totals[part or "other"] += ms
    return dict(totals)


def cuda_kernels(event):
    """(kernel name, ms) of the CUDA kernels `event` launched itself."""
    return [(k.name, k.duration / 1e3) for k in event.kernels]


def cpu_self_time(event):
    """(op name, ms of its own CPU time): the CPU stand-in for `cuda_kernels`, for checking the bookkeeping."""
    return [(event.name, event.self_cpu_time_total / 1e3)] if not event.name.startswith(PREFIX) else []


def host_time(event):
    """(name, ms of its own CPU time) of every event, the parts' ranges too (their own time is the Python between
    the ops of the part's modules): where the host's time in a step goes. A synchronize is left out: its time is
    the host waiting for the GPU."""
    if event.name.startswith("cuda") and "Synchronize" in event.name:
        return []
    return [(event.name, event.self_cpu_time_total / 1e3)]


# kind of kernel -> name fragments (lower case), first match wins; a kernel matching none is "other"
KERNEL_KINDS = {
    "scan forward": ("_scan_fwd_kernel",), "scan backward": ("_scan_bwd_kernel",), "scan parts": ("_part_",),
    "conv": ("_conv_fwd_kernel", "_conv_bwd_kernel"),
    "attention": ("flash", "fmha", "attention", "attn"),
    "matmul": ("gemm", "cutlass", "xmma", "nvjet", "wgmma", "splitk", "cublas"),
    "norm": ("layer_norm", "layernorm", "gammabeta", "_ln_fwd_kernel", "_ln_bwd_kernel"),
    "gather / scatter": ("index", "gather", "scatter"),
    "copy / cast / cat": ("copy", "cat", "fill"),
    "optimizer": ("multi_tensor", "adam"),
    "reduction": ("reduce",),
    "elementwise": ("elementwise", "vectorized", "_swiglu_"),
}


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, fragments in KERNEL_KINDS.items() if any(f in low for f in fragments)), "other")


def by_kernel(events, cost: Callable, top: int = 15) -> Tuple[Dict[str, float], Dict[str, float]]:
    """(ms per kind of kernel with "total", the `top` largest kernels by name in ms, names cut to 90 chars)."""
    kinds, names = defaultdict(float), defaultdict(float)
    for ev in events:
        for kernel_name, ms in cost(ev):
            kinds[kernel_kind(kernel_name)] += ms
            names[kernel_name[:90]] += ms
    kinds = dict(sorted(kinds.items(), key=lambda kv: -kv[1]))
    kinds["total"] = sum(kinds.values())
    return kinds, dict(sorted(names.items(), key=lambda kv: -kv[1])[:top])


def saved_by_part(model: nn.Module, forward: Callable, parts) -> Dict[str, float]:
    """MiB of the activations one `forward()` keeps for backward (autograd's saved tensors, each storage once,
    parameters left out), by the innermost part (see `annotated`) whose module saved it; plus "total"."""
    stack, seen, totals = [], set(), defaultdict(float)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    handles = []

    def leave(_module, _args, _output):
        stack.pop()

    for module, part in claimed_modules(model, parts):
        def enter(_module, _args, part=part):
            stack.append(part)

        handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def pack(t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key not in seen and key not in params:
                seen.add(key)
                totals[stack[-1] if stack else "other"] += storage.nbytes() / 2**20
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward()
    finally:
        for handle in handles:
            handle.remove()
    del out
    gc.collect()  # a saved output that the hook hands back is a reference cycle: without this, its graph stays
    totals = dict(sorted(totals.items(), key=lambda kv: -kv[1]))
    totals["total"] = sum(totals.values())
    return totals


def step_breakdown(model: nn.Module, forward_backward: Callable, optimizer, parts, kernel_rules,
                   device: str = "cuda", kernels: Optional[dict] = None) -> Dict[str, float]:
    """Profile one step (forward + backward, then the optimizer) and return ms per part, plus "total". Given a
    dict `kernels`, also fill it with "kinds" and "top" (`by_kernel`) of the same step, and on CUDA with "host"
    (host ms per part, `host_time`, with "total"), "top_host" (the host's largest ops by own time) and
    "launches" (the CUDA kernels the step launched)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with annotated(model, parts), torch.profiler.profile(activities=activities) as prof:
        forward_backward()
        with torch.autograd.profiler.record_function(PREFIX + "optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
    cost = cuda_kernels if device == "cuda" else cpu_self_time
    totals = categorize(prof.events(), cost, kernel_rules)
    totals["total"] = sum(totals.values())
    if kernels is not None:
        kernels["kinds"], kernels["top"] = by_kernel(prof.events(), cost)
        if device == "cuda":
            kernels["host"] = categorize(prof.events(), host_time, {})
            kernels["host"]["total"] = sum(kernels["host"].values())
            kernels["top_host"] = by_kernel(prof.events(), host_time)[1]
            kernels["launches"] = sum(len(ev.kernels) for ev in prof.events())
    return totals


def _is(*types):
    return lambda _name, module: isinstance(module, types)


def star_parts():
    """Parts of a StarPretrain step: the scan kernels, the rest of the mixers, MLPs, norms, the decoder."""
    from star.models.mamba import MambaMixer, SwiGLU

    decoder = ("feature_norms", "feature_proj", "decoder_blocks", "decoder_norm", "decoder_pred")
    return [("mixer", _is(MambaMixer)), ("mlp", _is(SwiGLU)),
            ("decoder", lambda name, _m: name.split(".")[0] in decoder),
            ("norm", _is(nn.LayerNorm)), ("embed", lambda name, _m: name == "patch_embed")]


def vit_parts():
    """Parts of a timm ViT step: attention blocks, MLPs, norms, the patch embedding, the head."""
    from timm.layers import Mlp
    from timm.models.vision_transformer import Attention

    return [("attention", _is(Attention)), ("mlp", _is(Mlp)), ("norm", _is(nn.LayerNorm)),
            ("embed", lambda name, _m: name == "patch_embed"), ("head", lambda name, _m: name == "head")]


KERNEL_RULES = {"scan": ("_scan_fwd_kernel", "_scan_bwd_kernel", "_part_end_state", "_part_adjoint",
                         "_part_carry")}


if __name__ == "__main__":  # the bookkeeping on the CPU: a tiny STAR step, parts by CPU self time
    import star

    model = star.create_model("star_pretrain_tiny_patch16_192", img_size=32, patch_size=4, in_chans=1, embed_dim=64,
                              depth=2, cluster_size=2, decoder_dim=64, decoder_num_heads=4, scan_impl="chunked")
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(2, 4, 1, 32, 32)
    kernels = {}
    print(step_breakdown(model, lambda: model(x)["loss"].backward(), opt, star_parts(), KERNEL_RULES, "cpu", kernels))
    print(kernels)
    print(saved_by_part(model, lambda: model(x)["loss"], star_parts()))
