"""The `star` command.

    star pretrain  --config fmnist-tiny [--section.field value ...]   STAR/ARM pretraining
    star finetune  --config fmnist-tiny [--pretrained RUN_DIR ...]    fine-tune a classifier
    star linprobe  --config fmnist-tiny [--pretrained RUN_DIR ...]    linear probe of a pretrained encoder
    star eval      RUN_DIR [--split test] [--data.dataset PATH ...]   accuracy of a classifier
    star predict   RUN_DIR IMAGE [IMAGE ...] [--topk 5]               classes of image files
    star visualize RUN_DIR [--out predictions.png]                   next-cluster predictions as a PNG
    star demo      [--output_dir runs/demo]                          pretrain + fine-tune + eval on Fashion-MNIST
    star shards    SRC OUT                                           tar shards of an ImageNet-layout folder

Every config field can be overridden with --dotted.name value; `star pretrain --help` lists them, and
`--print-config` shows the values a preset gives them.
"""

import argparse
import sys
from typing import List, Optional

TASKS = ("pretrain", "finetune", "linprobe")
DEVICES = ("auto", "cpu", "cuda")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    from star.config import config_help

    parser = argparse.ArgumentParser(prog="star", description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for task in TASKS:
        p = sub.add_parser(task, help=f"{task} (config fields as --section.field value)",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="config fields (--name value, or --name=value):\n" + config_help())
        p.add_argument("--config", default="fmnist-tiny",
                       help="preset name or YAML path (default: fmnist-tiny); see `star configs`")
        p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p = sub.add_parser("eval", help="top-1/top-5 accuracy of a fine-tuned run on a dataset split",
                       epilog="Config fields of the run can be overridden too, e.g. --data.dataset PATH "
                              "--data.num_workers 8 (see `star finetune --help`).")
    p.add_argument("run", help="run directory or saved model folder")
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--device", default="auto", choices=DEVICES)
    p.add_argument("--batch-size", type=_positive_int, default=None, help="default: the run's batch size")
    p = sub.add_parser("predict", help="top-k classes of image files")
    p.add_argument("run", help="run directory or saved model folder")
    p.add_argument("images", nargs="+")
    p.add_argument("--topk", type=_positive_int, default=5)
    p.add_argument("--convert", action="store_true", help="convert images to the model's channel count")
    p.add_argument("--device", default="auto", choices=DEVICES)
    p = sub.add_parser("visualize", help="PNG of real images next to next-cluster predictions")
    p.add_argument("run", help="pretraining run directory or saved model folder")
    p.add_argument("--out", default=None, help="PNG path (default: RUN/predictions.png)")
    p.add_argument("--sequences", type=_positive_int, default=4)
    p.add_argument("--split", default="test", choices=("train", "val", "test"))
    p.add_argument("--device", default="auto", choices=DEVICES)
    p = sub.add_parser("demo", help="the main job: STAR pretrain + fine-tune + test accuracy on Fashion-MNIST")
    p.add_argument("--output_dir", default="runs/demo")
    p.add_argument("--config", default="fmnist-demo")
    p = sub.add_parser("shards", help="write WebDataset-format tar shards of an ImageNet-layout folder")
    p.add_argument("src", help="folder with train/<class>/* (and val/<class>/*)")
    p.add_argument("out", help="output folder: OUT/train/*.tar, OUT/val/*.tar")
    p.add_argument("--samples-per-shard", type=int, default=5000)
    p.add_argument("--seed", type=int, default=0)
    sub.add_parser("configs", help="list the shipped config presets")
    return parser


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


def main(argv: Optional[List[str]] = None) -> int:
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
            print(f"{args.split}: {r['images']} images{skipped}, top-1 {r['top1']:.2f}%, top-5 {r['top5']:.2f}%, "
                  f"loss {r['loss']:.4f}")
        elif args.command == "predict":
            from star.cli.inference import predict_files

            results, errors = predict_files(args.run, args.images, args.topk, args.convert, args.device)
            for file, ranked in results:
                print(f"{file}: " + ", ".join(f"{name} {p:.3f}" for name, p in ranked))
            for error in errors:
                print(f"star predict: error: {error}", file=sys.stderr)
            if errors:
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
