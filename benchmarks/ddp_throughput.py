"""STAR pretraining throughput on N GPUs (DDP or FSDP2), for the multi-GPU scaling efficiency.

    torchrun --nproc_per_node N benchmarks/ddp_throughput.py --batch-size 128 --out results.jsonl

Times the full training step the engine runs (bf16 autocast forward, backward with the gradient
all-reduce, clipping, AdamW) on random images already on the GPU, so the number is the model and
communication cost alone, without data loading. Appends one JSON line per run (rank 0).
"""

import argparse
import json
import time

import torch
import torch.distributed as dist

import star
from star.config import OptimConfig
from star.training import create_optimizer
from star.training.distributed import destroy_distributed, init_distributed, wrap_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="star_pretrain_base_patch16_192")
    parser.add_argument("--batch-size", type=int, default=128, help="images per GPU per step")
    parser.add_argument("--steps", type=int, default=20, help="timed steps")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (kernel compilation)")
    parser.add_argument("--strategy", default="ddp", choices=("ddp", "fsdp"))
    parser.add_argument("--out", default=None, help="append the result as a JSON line here")
    args = parser.parse_args()

    env = init_distributed()
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(env.rank)
    model = star.create_model(args.model).to(device)
    train_model = wrap_model(model, device, args.strategy) if env.world_size > 1 else model
    optimizer = create_optimizer(model, OptimConfig(), lr=1e-4)
    k = model.num_images
    images = torch.randn(args.batch_size // k, k, model.in_chans, model.img_size, model.img_size, device=device)

    def step() -> torch.Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = train_model(images)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 3.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    if env.world_size > 1:
        dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    loss.item()
    torch.cuda.synchronize()
    if env.world_size > 1:
        dist.barrier()
    seconds = time.perf_counter() - start
    result = {
        "model": args.model, "strategy": args.strategy, "gpus": env.world_size, "batch_per_gpu": args.batch_size,
        "images_per_sequence": k, "steps": args.steps,
        "step_ms": 1000 * seconds / args.steps, "images_per_s": args.batch_size * env.world_size * args.steps / seconds,
        "max_memory_gib": torch.cuda.max_memory_allocated() / 2**30, "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
    }
    print(json.dumps(result))
    if env.is_main and args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    destroy_distributed()


if __name__ == "__main__":
    main()
