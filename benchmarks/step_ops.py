"""Count the PyTorch ops one training step dispatches (forward + backward), on the meta device: no data, no
compute, any machine. On a GPU nearly every op that is not a view or an allocation is a kernel launch, so this
is the per-step launch overhead that CUDA graphs or torch.compile would remove. The Triton scan and conv count
as one op each (their fake implementations run on meta).

    python benchmarks/step_ops.py [--out docs/benchmarks/step_ops.json]
"""
import argparse
import collections
import json
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from star.models import create_model
from star.training.provenance import git_commit

# ops that move no data on a GPU: views, metadata and allocations
NO_LAUNCH = {"aten.view", "aten._unsafe_view", "aten.as_strided", "aten.transpose", "aten.t", "aten.permute",
             "aten.expand", "aten.unsqueeze", "aten.squeeze", "aten.select", "aten.slice", "aten.split",
             "aten.split_with_sizes", "aten.chunk", "aten.unbind", "aten.alias", "aten.detach", "aten.reshape",
             "aten.flatten", "aten.unflatten", "aten.empty", "aten.empty_strided", "aten.new_empty",
             "aten.new_empty_strided", "aten.empty_like", "aten.diagonal", "aten.narrow", "aten.lift_fresh"}
# name -> (registry model, overrides, input shape per sample); the study's models at 32 px, and 224 px
CASES = {
    "star_tiny classifier, 32 px (Fashion-MNIST study)": (
        "star_tiny_patch16_224", dict(img_size=32, patch_size=4, in_chans=1, num_classes=10), (1, 32, 32)),
    "star_tiny pretraining, 32 px, K=4 (Fashion-MNIST study)": (
        "star_pretrain_tiny_patch16_192", dict(img_size=32, patch_size=4, in_chans=1, cluster_size=2, num_images=4),
        (4, 1, 32, 32)),
    "star_tiny classifier, 224 px": ("star_tiny_patch16_224", dict(num_classes=1000), (3, 224, 224)),
}


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count(name: str, overrides: dict, sample_shape: tuple) -> dict:
    with torch.device("meta"):
        model = create_model(name, scan_impl="triton", **overrides).train()
        images = torch.randn(2, *sample_shape)
    with CountOps() as counter:
        out = model(images)
        loss = out["loss"] if isinstance(out, dict) else out.logsumexp(-1).mean()
        loss.backward()
    launches = {k: v for k, v in counter.ops.items() if k not in NO_LAUNCH}
    return dict(ops=sum(counter.ops.values()), launching_ops=sum(launches.values()),
                most_common=collections.Counter(launches).most_common(8))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write the counts here as JSON")
    args = parser.parse_args()
    rows = []
    for case, (name, overrides, shape) in CASES.items():
        rows.append(dict(case=case, model=name, **count(name, overrides, shape)))
        print(f"{case}: {rows[-1]['launching_ops']} launching ops ({rows[-1]['ops']} in all) in forward + backward")
    if args.out:
        args.out.write_text(json.dumps(dict(commit=git_commit(), torch=torch.__version__, rows=rows), indent=1) + "\n")


if __name__ == "__main__":
    main()
