"""The `star` command.

    star pretrain  --config fmnist-tiny [--section.field value ...]   STAR/ARM pretraining
    star finetune  --config fmnist-tiny [--pretrained RUN_DIR ...]    fine-tune a classifier
    star linprobe  --config fmnist-tiny [--pretrained RUN_DIR ...]    linear probe of a pretrained encoder
    star eval      RUN_DIR [--split test] [--data.dataset PATH ...]   accuracy of a classifier
    star predict   RUN_DIR IMAGE [IMAGE ...] [--topk 5]               classes of image files
    star visualize RUN_DIR [--out predictions.png]                   next-cluster predictions as a PNG
    star demo      [--output_dir runs/demo]                          pretrain + fine-tune + eval on Fashion-MNIST
    star shards    SRC OUT                                           tar shards of an ImageNet-layout folder
    star convert   arm CHECKPOINT --out DIR                          an ARM checkpoint as a star model folder
    star download  fashion-mnist [--to DIR]                          Fashion-MNIST via torchvision (network)

Every config field can be overridden with --dotted.name value; `star pretrain --help` lists them, and
`--print_config` shows the values a preset gives them. Flags are spelled with underscores, like the config
fields (--output_dir, --batch_size); the hyphenated spellings (--output-dir) work too.
"""

import argparse
import os
import sys
from typing import List, Optional

from star.config import DEVICES, TASKS
DEVICE_HELP = "default: auto = cuda when available, else cpu"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    from star import __version__
    from star.config import config_help

    parser = argparse.ArgumentParser(prog="star", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--version", action="version", version=f"star {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fields = config_help()
    for task in TASKS:
        p = sub.add_parser(task, help=f"{task} (config fields as --section.field value)",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="config fields (--name value, or --name=value):\n" + fields)
        p.add_argument("--config", default="fmnist-tiny",
                       help="preset name or YAML path (default: fmnist-tiny); see `star configs`")
        p.add_argument("--print_config", "--print-config", action="store_true",
                       help="print the resolved config and exit")
    p = sub.add_parser("eval", help="top-1/top-5 accuracy of a fine-tuned run on a dataset split",
                       epilog="Config fields of the run can be overridden too, e.g. --data.dataset PATH "
                              "--data.num_workers 8 (see `star finetune --help`).")
    p.add_argument("run", help="run directory or saved model folder")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="default: test; val of a run that held out training images (data.val_size) is that holdout")
    p.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    p.add_argument("--batch_size", "--batch-size", type=_positive_int, default=None,
                   help="images per forward pass (default: the run's optim.batch_size)")
    p = sub.add_parser("predict", help="top-k classes of image files")
    p.add_argument("run", help="run directory or saved model folder")
    p.add_argument("images", nargs="+", help="image files; one that cannot be read is reported, the rest answered")
    p.add_argument("--topk", type=_positive_int, default=5, help="classes shown per image (default: 5)")
    p.add_argument("--convert", action="store_true", help="convert images to the model's channel count")
    p.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    p = sub.add_parser("visualize", help="PNG of real images next to next-cluster predictions")
    p.add_argument("run", help="pretraining run directory or saved model folder")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/predictions.png)")
    p.add_argument("--sequences", type=_positive_int, default=4, help="rows drawn, K images each (default: 4)")
    p.add_argument("--split", default="test", choices=("train", "val", "test"),
                   help="where the images come from (default: test)")
    p.add_argument("--device", default="auto", choices=DEVICES, help=DEVICE_HELP)
    p = sub.add_parser("demo", help="the main job: STAR pretrain + fine-tune + test accuracy on Fashion-MNIST")
    p.add_argument("--output_dir", "--output-dir", default="runs/demo",
                   help="where the two runs and predictions.png go (default: runs/demo)")
    p.add_argument("--config", default="fmnist-demo", help="preset or YAML path (default: fmnist-demo)")
    p = sub.add_parser("shards", help="write WebDataset-format tar shards of an ImageNet-layout folder")
    p.add_argument("src", help="folder with train/<class>/* (and val/<class>/*)")
    p.add_argument("out", help="output folder: OUT/train/*.tar, OUT/val/*.tar")
    p.add_argument("--samples_per_shard", "--samples-per-shard", type=int, default=5000,
                   help="images per tar file (default: 5000)")
    p.add_argument("--seed", type=int, default=0, help="of the shuffle that mixes classes across shards (default: 0)")
    p = sub.add_parser("convert", help="an ARM checkpoint (pretrained or fine-tuned) as a star model folder")
    p.add_argument("source", choices=("arm",), help="the code base that wrote the checkpoint")
    p.add_argument("checkpoint", help="a .pth ({'model': state_dict, ...}) or .safetensors file")
    p.add_argument("--out", required=True, help="model folder to write (config.json, model.safetensors)")
    p.add_argument("--global_pool", "--global-pool", default="avg", choices=("avg", "token"),
                   help="how a fine-tuned model pooled (not in the weights): avg = ARM's recipe "
                        "(--global_pool True), token = the cls token (--cls_token); default: avg")
    p.add_argument("--key", default="model", help="the checkpoint entry holding the weights (default: model; "
                                                  "e.g. model_ema)")
    p = sub.add_parser("download", help="fetch a dataset with torchvision's downloader (needs a network)")
    p.add_argument("dataset", choices=("fashion-mnist",))
    p.add_argument("--to", default=None, help="folder for the files (default: the cache folder star searches, "
                                              "~/.cache/star/fashion-mnist)")
    sub.add_parser("configs", help="list the shipped config presets")
    return parser


def _convert(args) -> None:
    from star.convert import convert_arm

    model, dropped = convert_arm(args.checkpoint, args.out, global_pool=args.global_pool, key=args.key)
    a = model.init_args
    if "num_classes" in a:
        kind, details = "fine-tuned", f"{a['num_classes']} classes, global_pool {a['global_pool']}"
    else:
        kind, details = "pretraining", "K=1, no separator"
    print(f"{kind} ARM checkpoint -> {type(model).__name__} (embed_dim {a['embed_dim']}, depth {a['depth']}, "
          f"{a['img_size']} px, {details})")
    by_reason: dict = {}
    for key, why in dropped.items():
        by_reason.setdefault(why, []).append(key)
    for why, keys in by_reason.items():
        shown = ", ".join(keys[:6]) + (f", ... ({len(keys)} keys)" if len(keys) > 6 else "")
        print(f"dropped {shown}: {why}")
    if not dropped:
        print("nothing dropped")
    print(f"wrote {args.out}")


def _train(args, overrides: List[str]) -> None:
    from star.config import apply_overrides, config_to_yaml, load_config
    from star.cli.train import run

    cfg = apply_overrides(load_config(args.config, task=args.command), overrides)
    if args.print_config:
        print(config_to_yaml(cfg), end="")
        return
    results = run(cfg)
    if results:
        print("final: " + ", ".join(f"{k} {v:.4f}" for k, v in results.items()))


def _passive_cpu_threads() -> None:
    """Waiting CPU threads sleep instead of spinning (OpenMP's passive policy) unless the user chose a policy:
    on cores that other processes share, torch's spinning threads made fmnist-demo pretraining steps 5-12x
    slower (README, "Quick start"). OpenMP reads it when torch loads, so this runs before any torch import."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main(argv: Optional[List[str]] = None) -> int:
    _passive_cpu_threads()
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.command not in TASKS + ("eval",):
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        if args.command in TASKS:
            _train(args, rest)
        elif args.command == "eval":
            from star.cli.inference import evaluate_run

            r = evaluate_run(args.run, rest, args.split, args.device, args.batch_size)
            skipped = f" ({r['skipped']} unreadable files skipped, --data.skip_corrupt)" if r["skipped"] else ""
            print(f"{r['split']}: {r['images']} images{skipped}, top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}%, "
                  f"loss {r['loss']:.4f}")
        elif args.command == "predict":
            from star.cli.inference import predict_files

            results, failed = predict_files(args.run, args.images, args.topk, args.convert, args.device)
            for file, ranked in results:
                print(f"{file}: " + ", ".join(f"{name} {p:.3f}" for name, p in ranked))
            for file, why in failed:
                print(f"star predict: error: {why}", file=sys.stderr)
            if failed:
                return 2
        elif args.command == "visualize":
            from star.cli.inference import draw_predictions

            out = args.out or f"{args.run.rstrip('/')}/predictions.png"
            print(f"wrote {draw_predictions(args.run, out, args.sequences, args.split, args.device)}")
        elif args.command == "demo":
            from star.cli.demo import demo

            demo(args.output_dir, args.config)
        elif args.command == "shards":
            from pathlib import Path

            from star.data.shards import write_shards

            splits = [s for s in ("train", "val") if (Path(args.src) / s).is_dir()]
            if not splits:
                raise ValueError(f"{args.src} has neither train/ nor val/: expected an ImageNet-layout folder")
            for split in splits:
                shards = write_shards(args.src, args.out, split, args.samples_per_shard, args.seed)
                print(f"{split}: {len(shards)} shards in {Path(args.out) / split}")
        elif args.command == "convert":
            _convert(args)
        elif args.command == "download":
            from star.data import download_fashion_mnist

            print(f"Fashion-MNIST in {download_fashion_mnist(args.to)}")
        elif args.command == "configs":
            from star.config import list_presets

            print("\n".join(list_presets()))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        print(f"star {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"star {args.command}: interrupted; `--resume auto` continues from the last checkpoint",
              file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
