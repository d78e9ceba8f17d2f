"""Using trained models: accuracy on a dataset, classes of image files, and pictures of next-cluster predictions."""

import json
from pathlib import Path
from typing import List, Optional

import torch
from PIL import Image

from star.config import apply_overrides
from star.data import build_dataset, convert_image
from star.data.folder import open_image
from star.models import StarPretrain, VisionMambaClassifier
from star.build import (check_num_classes, classification_transform, data_preset, eval_loader, holdout_set,
                        load_run, num_skipped)
from star.models.hub import CLASSES_FILE
from star.training import evaluate, resolve_device
from star.training.distributed import all_gather_objects, destroy_distributed, init_distributed


def evaluate_run(path: str, cfg_overrides, split: str = "test", device: str = "auto",
                 batch_size: Optional[int] = None) -> dict:
    """Top-1/top-5 accuracy of a fine-tuned run (or model folder) on `split` of its dataset; "val" of a run
    that held out training images (data.val_size) is that holdout. The result names the split truthfully."""
    model, _, cfg = load_run(path, "finetune")
    cfg = apply_overrides(cfg, cfg_overrides)
    if not isinstance(model, VisionMambaClassifier):
        raise ValueError(f"{path} holds a {type(model).__name__}; `star eval` measures classifiers "
                         "(fine-tune or linear-probe it first)")
    data = cfg.data
    transform = classification_transform(cfg, model.img_size, model.in_chans, train=False)
    common = dict(root=data.root, in_chans=model.in_chans, img_size=model.img_size,
                  skip_corrupt="drop" if data.skip_corrupt else False)
    if split == "val" and data.val_size > 0:  # what the run validated on
        dataset = holdout_set(cfg, transform, seed=cfg.seed, **common)
        split = f"val ({len(dataset)} training images held out by data.val_size, as in training)"
    else:
        dataset = build_dataset(data.dataset, split, transform, **common)
        actual = getattr(dataset, "split", split)
        if actual != split:  # e.g. Fashion-MNIST, whose "val" is its test set
            split = f"{split} (= the {actual} split of {data.dataset}, which has no {split} split)"
    check_num_classes(model, dataset, data.dataset)
    init_distributed(device)  # under torchrun each rank evaluates its share; counts are all-reduced
    try:
        loader = eval_loader(dataset, batch_size or cfg.optim.batch_size, data.num_workers)
        dev = resolve_device(device)
        results = evaluate(model.to(dev), loader, dev)
        skipped = sum(all_gather_objects(num_skipped(dataset)))  # each rank met its share's
        return {"split": split, "images": len(dataset) - skipped, "skipped": skipped, **results}
    finally:
        destroy_distributed()


def _open_image(path: Path, in_chans: int, convert: bool) -> Image.Image:
    image = open_image(path)
    channels = len(image.getbands())
    mode = "L" if in_chans == 1 else "RGB"
    if channels != in_chans and not convert and not (in_chans == 3 and image.mode == "P"):
        raise ValueError(f"{path} has {channels} channel(s) ({image.mode}) but the model takes {in_chans}; "
                         f"pass --convert to convert it to {mode}")
    return convert_image(image, mode)


def predict_files(path: str, files: List[str], topk: int = 5, convert: bool = False, device: str = "auto"):
    """([(file, [(class name, probability), ...])] for each readable image file, best first, and
    [(file, why)] for those that could not be used): one bad file does not cost the others their answer."""
    model, model_dir, cfg = load_run(path, "finetune")
    if not isinstance(model, VisionMambaClassifier):
        raise ValueError(f"{path} holds a {type(model).__name__}, not a classifier")
    classes_file = model_dir / CLASSES_FILE
    names = json.loads(classes_file.read_text()) if classes_file.is_file() else []
    if len(names) != model.num_classes:  # no names saved (or a folder edited by hand): number the classes
        names = [str(i) for i in range(model.num_classes)]
    transform = classification_transform(cfg, model.img_size, model.in_chans, train=False)
    read, failed = [], []
    for f in files:
        try:
            read.append((f, transform(_open_image(Path(f), model.in_chans, convert))))
        except ValueError as err:
            failed.append((f, str(err)))
    if not read:
        return [], failed
    dev = resolve_device(device)
    with torch.no_grad():
        probs = model.to(dev).eval()(torch.stack([x for _, x in read]).to(dev)).float().softmax(-1).cpu()
    top = probs.topk(min(topk, probs.shape[1]), dim=1)
    return [(f, [(names[i], p) for p, i in zip(values.tolist(), indices.tolist())])
            for (f, _), values, indices in zip(read, top.values, top.indices)], failed


def draw_predictions(path: str, out: str, num_sequences: int = 4, split: str = "test", device: str = "auto") -> Path:
    """A PNG of real images next to the pretrained model's next-cluster predictions (each cluster predicted
    from everything before it in the STAR sequence)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    model, _, cfg = load_run(path, "pretrain")
    if not isinstance(model, StarPretrain):
        raise ValueError(f"{path} holds a {type(model).__name__}; `star visualize` draws a pretraining model")
    preset = data_preset(cfg, model.in_chans)
    k = model.num_images
    transform = classification_transform(cfg, model.img_size, model.in_chans, train=False)
    dataset = build_dataset(cfg.data.dataset, split, transform, root=cfg.data.root,
                            in_chans=model.in_chans, img_size=model.img_size)
    if len(dataset) < num_sequences * k:
        raise ValueError(f"{split} split has {len(dataset)} images, fewer than {num_sequences} sequences of {k}")
    images = torch.stack([dataset[i][0] for i in range(num_sequences * k)]).view(num_sequences, k,
                                                                                 *dataset[0][0].shape)
    dev = resolve_device(device)
    out_dict = model.to(dev).eval().predict_images(images.to(dev))
    mean = torch.tensor(preset.mean).view(-1, 1, 1)
    std = torch.tensor(preset.std).view(-1, 1, 1)

    def to_numpy(img):
        img = (img.cpu() * std + mean).clamp(0, 1)
        return img[0].numpy() if img.shape[0] == 1 else img.permute(1, 2, 0).numpy()

    fig, axes = plt.subplots(num_sequences, 2 * k, figsize=(2 * k * 1.3, num_sequences * 1.4), squeeze=False)
    for s in range(num_sequences):
        for j in range(k):
            pred = torch.where(out_dict["predicted"][s, j].cpu(), out_dict["images"][s, j].cpu(),
                               torch.zeros(()))
            for col, (img, title) in enumerate(((images[s, j], "real"), (pred, "predicted"))):
                ax = axes[s, 2 * j + col]
                ax.imshow(to_numpy(img), cmap="gray" if model.in_chans == 1 else None, vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if s == 0:
                    ax.set_title(f"image {j + 1}\n{title}", fontsize=8)
    fig.suptitle(f"next-cluster predictions, {k} images per sequence (loss {out_dict['loss'].item():.3f}); "
                 "each predicted patch is drawn with the real patch's mean and std, as MAE does", fontsize=9)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return Path(out)
