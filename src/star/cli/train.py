"""`star pretrain/finetune/linprobe`: build what a `TrainConfig` describes (`star.build`), train it (the
engine in `star.training`) and save the final weights with the config beside them (MAE's entry point)."""

import traceback

from star.build import build_loaders, build_model, build_trainer, check_num_classes, num_skipped
from star.config import TrainConfig, check_config
from star.models.hub import MODEL_DIR
from star.training import create_loss_fn, seed_everything
from star.training.distributed import destroy_distributed, full_model_state_dict, init_distributed, is_sharded


def run(cfg: TrainConfig) -> dict:
    """Train as `cfg` says, on one process or under torchrun/SLURM; the final weights go to
    `<output_dir>/model` (and `model_ema` with EMA)."""
    check_config(cfg)  # before the model and the data set are built
    init_distributed(cfg.device)
    try:
        return _train(cfg)
    except BaseException as err:
        # the finished frames in its traceback hold the trainer and the model: let destroy_distributed free them
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        destroy_distributed()


def _train(cfg: TrainConfig) -> dict:
    """The body of `run`, in a frame of its own that a failure's traceback can be cleared of."""
    seed_everything(cfg.seed)  # every rank builds the same initial weights
    model = build_model(cfg)
    train_loader, val_loader = build_loaders(cfg, model)
    num_classes = getattr(model, "num_classes", None)
    check_num_classes(model, train_loader.dataset, cfg.data.dataset)
    trainer = build_trainer(cfg, model, create_loss_fn(cfg, num_classes), train_loader, val_loader)
    try:
        results = trainer.fit()
        weights = full_model_state_dict(model) if is_sharded(model) else None  # a collective: all ranks
        if trainer.is_main:
            saved = [(model, weights, trainer.run_dir / MODEL_DIR)]
            if trainer.ema is not None:
                saved.append((trainer.ema.module, None, trainer.run_dir / f"{MODEL_DIR}_ema"))
            for module, state, folder in saved:
                trainer.write_model_folder(module, folder, state)
            splits = {"training": train_loader, "validation": val_loader}
            skipped = {name: num_skipped(loader.dataset) for name, loader in splits.items() if loader is not None}
            if any(skipped.values()):
                print(f"skipped {sum(skipped.values())} corrupt image files (--data.skip_corrupt): "
                      + ", ".join(f"{n} in {name}" for name, n in skipped.items()))
            print(f"saved {trainer.run_dir / MODEL_DIR}")
    finally:
        trainer.close()  # the run directory stays locked until model/ is written
    return results
