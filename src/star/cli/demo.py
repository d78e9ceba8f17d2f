"""The main job: a short STAR pretrain + fine-tune of a small model on Fashion-MNIST, on the CPU.

It writes `<output_dir>/pretrain`, `<output_dir>/finetune`, prints the test accuracy and draws the
pretrained model's next-cluster predictions next to the real images. Rerunning continues where it stopped.
"""

import time
from pathlib import Path

from star.cli.inference import draw_predictions, evaluate_run
from star.cli.train import run
from star.config import load_config


def demo(output_dir: str = "runs/demo", config: str = "fmnist-demo") -> dict:
    start, out = time.time(), Path(output_dir)
    for task, source in (("pretrain", None), ("finetune", out / "pretrain")):
        cfg = load_config(config, task=task)
        cfg.output_dir, cfg.resume = str(out / task), "auto"
        if source is not None:
            cfg.pretrained = str(source)
        print(f"== {task}: {cfg.model.name} on {cfg.data.dataset}, {cfg.optim.epochs} epochs -> {cfg.output_dir}")
        run(cfg)
    png = draw_predictions(str(out / "pretrain"), str(out / "predictions.png"))
    result = evaluate_run(str(out / "finetune"), [], split="test")
    minutes = (time.time() - start) / 60
    print(f"== {cfg.data.dataset} test accuracy: top-1 {result['top1']:.2f}% ({result['images']} images); "
          f"predictions drawn in {png}; {minutes:.1f} min in all")
    return result
