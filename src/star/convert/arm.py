"""ARM checkpoints (github.com/OliverRensu/ARM, `{"model": state_dict}` as its training code saves them) as star
models: a pretraining checkpoint becomes a `StarPretrain` with K=1 and no separator, a fine-tuned one a
`VisionMambaClassifier`, both with outputs equal to ARM's.

The map, read off ARM's models_pretrain.py, Finetuning/models_mamba.py and mamba_simple.py:

    patch_embed.proj.*                 -> patch_embed.proj.*
    layers.{i}.norm1, norm2            -> blocks.{i}.norm1, norm2
    layers.{i}.mixer.in_proj, out_proj -> blocks.{i}.mixer.in_proj, out_proj
    layers.{i}.mixer.conv1d{s}, x_proj{s}, dt_proj{s}, A{s}_log, D{s}
                                       -> blocks.{i}.mixer.directions.{d}.conv1d, x_proj, dt_proj, A_log, D
        s = "", "_b", "_c", "_c_b" is d = 0..3: rows, the whole sequence reversed, columns (the cls token kept
        in the middle), columns reversed; ARM sums the four and divides by 4 before out_proj, as star does
    layers.{i}.mlp.w1, w2, w3          -> blocks.{i}.mlp.fc1_g, fc1_x, fc2   (w3(silu(w1 x) * w2 x))
  pretraining
    pos_embed (fixed sin-cos, no cls)  -> pos_embed
    norm_1..4                          -> feature_norms.0..3
    enc2dec                            -> feature_proj, output rows regrouped: ARM gives decoder block k the
                                          outputs k, k+4, k+8, ...; star the k-th quarter
    dec_block.{i}.attn2.q, kv, proj    -> decoder_blocks.{i}.q, kv, proj
    dec_block.{i}.norm2_1, norm2_2     -> decoder_blocks.{i}.norm_q, norm_kv
    dec_block.{i}.norm2, mlp.fc1, fc2  -> decoder_blocks.{i}.norm2, mlp.fc1, fc2
    ar_token, ar_norm, ar_pred         -> mask_token, decoder_norm, decoder_pred
    dec_pos_embed, mask                   dropped: star computes both. Its sin-cos lists the same columns in
                                          another order (rows first, sines first), so the decoder's width is
                                          permuted to match and the decoder's outputs stay ARM's.
    A decoder star's cannot hold exactly (another head width, a learned dec_pos_embed) is listed as dropped,
    key by key, and star's own starts fresh; the encoder is kept either way.
  fine-tuned
    cls_token + pos_embed[N/2]         -> cls_token (ARM adds a position to the middle cls token; star none)
    pos_embed without row N/2          -> pos_embed
    norm_f, head                       -> norm (fc_norm=False: every token normed, then pooled), head
"""

import argparse
import math
import re
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple, Union

import torch
import torch.nn as nn

from star.models import SIZES, StarPretrain, VisionMambaClassifier
from star.models.hub import state_dict_mismatches
from star.models.patches import sincos_pos_embed

ARM_CLUSTER_SIZE = 4  # ARM serializes 4x4-patch clusters (models_pretrain.py)
ARM_HEAD_DIM = 64  # ARM's decoder has dec_embed_dim // 64 heads; the weights don't record it
DIRECTION_SUFFIXES = ("", "_b", "_c", "_c_b")
ARM_DECODER_KEYS = ("ar_token", "dec_pos_embed", "enc2dec.", "dec_block.", "norm_1.", "norm_2.", "norm_3.",
                    "norm_4.", "ar_norm.", "ar_pred.", "mask")
SSM_NAMES = ("conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight", "dt_proj.bias", "A_log", "D")
Checkpoint = Union[str, Path, Mapping[str, object]]


def load_arm_state_dict(checkpoint: Checkpoint, key: str = "model") -> Dict[str, torch.Tensor]:
    """The state dict of an ARM checkpoint: a .pth/.safetensors file or a loaded dict, `{key: state_dict}` or
    the state dict itself. A .pth is read with weights_only (tensors and argparse options only)."""
    if isinstance(checkpoint, (str, Path)):
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            checkpoint = load_file(str(path))
        else:
            try:
                with torch.serialization.safe_globals([argparse.Namespace]):  # ARM saves its args beside the model
                    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # pickle errors come as several types
                raise ValueError(f"{path} is not a checkpoint torch can read safely ({str(err).splitlines()[0]}); "
                                 f"if you trust it, load it with torch.load(path, weights_only=False) and pass the "
                                 f"dict to star.convert_arm") from None
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a checkpoint dict, got a {type(checkpoint).__name__}")
    state = checkpoint.get(key, checkpoint)
    if not isinstance(state, Mapping) or not state or not all(torch.is_tensor(v) for v in state.values()):
        found = ", ".join(sorted(str(k) for k in checkpoint)[:8])
        raise ValueError(f"the checkpoint has no state dict under {key!r} (its keys: {found})")
    return dict(state)


def _grid(rows: int, what: str) -> int:
    grid = math.isqrt(rows)
    if grid * grid != rows:
        raise ValueError(f"{what} has {rows} rows, not a square patch grid")
    return grid


def _encoder_args(state: Mapping[str, torch.Tensor]) -> dict:
    """The encoder's geometry from the weights' shapes, checked against what star's blocks assume."""
    if "patch_embed.proj.weight" not in state:
        raise ValueError("not an ARM checkpoint: no patch_embed.proj.weight")
    dim, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
    layers = {int(m.group(1)) for k in state for m in [re.match(r"layers\.(\d+)\.", k)] if m}
    if not layers or layers != set(range(max(layers) + 1)):
        raise ValueError(f"expected blocks layers.0 .. layers.N, found {sorted(layers)}")
    d_inner, d_state = state["layers.0.mixer.A_log"].shape
    if d_inner % dim:
        raise ValueError(f"the mixer's inner width {d_inner} is not a multiple of the width {dim}")
    dt_rank = state["layers.0.mixer.x_proj.weight"].shape[0] - 2 * d_state
    if dt_rank != math.ceil(dim / 16):
        raise ValueError(f"dt_rank {dt_rank} differs from ceil(dim / 16) = {math.ceil(dim / 16)}, which star uses")
    hidden = state["layers.0.mlp.w1.weight"].shape[0]
    if hidden != int(dim * 4 * 2 / 3):
        raise ValueError(f"SwiGLU hidden width {hidden} differs from int(dim * 8 / 3) = {int(dim * 4 * 2 / 3)}")
    return dict(patch_size=patch, in_chans=in_chans, embed_dim=dim, depth=max(layers) + 1, d_state=d_state,
                d_conv=state["layers.0.mixer.conv1d.weight"].shape[-1], expand=d_inner // dim)


def _blocks(state: Mapping[str, torch.Tensor], depth: int, num_directions: int, out: dict) -> None:
    """ARM's layers.* as star's blocks.* (moved from `state` into `out`)."""
    for i in range(depth):
        src, dst = f"layers.{i}.", f"blocks.{i}."
        for name in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias", "mixer.in_proj.weight",
                     "mixer.out_proj.weight"):
            out[dst + name] = state.pop(src + name)
        for arm, ours in (("w1", "fc1_g"), ("w2", "fc1_x"), ("w3", "fc2")):
            for kind in ("weight", "bias"):
                out[f"{dst}mlp.{ours}.{kind}"] = state.pop(f"{src}mlp.{arm}.{kind}")
        for d, suffix in enumerate(DIRECTION_SUFFIXES[:num_directions]):
            for name in SSM_NAMES:
                if name in ("A_log", "D"):
                    arm = f"A{suffix}_log" if name == "A_log" else f"D{suffix}"
                else:
                    module, kind = name.split(".")
                    arm = f"{module}{suffix}.{kind}"
                out[f"{dst}mixer.directions.{d}.{name}"] = state.pop(f"{src}mixer.{arm}")


def _sincos_permutation(dim: int, grid: int, theirs: torch.Tensor) -> Optional[torch.Tensor]:
    """perm with star's sin-cos embedding[:, j] == ARM's[:, perm[j]], or None when `theirs` is not ARM's.
    ARM's (MAE's get_2d_sincos_pos_embed) lists [sin w, cos w, sin h, cos h], star's (timm's
    build_sincos2d_pos_embed) [sin h, sin w, cos h, cos w], each dim/4 wide. Derived, then checked: matching
    columns by value cannot tell apart the low-frequency cosines, which agree to 1e-7 at width 512."""
    q = dim // 4
    perm = torch.cat([torch.arange(2 * q, 3 * q), torch.arange(q), torch.arange(3 * q, 4 * q), torch.arange(q, 2 * q)])
    ours = sincos_pos_embed(dim, grid)[0]
    if dim % 4 or theirs.shape != ours.shape or not torch.allclose(ours, theirs[:, perm].float(), atol=1e-5):
        return None
    return perm


def _decoder(state: Dict[str, torch.Tensor], model_args: dict, out: dict, dropped: Dict[str, str]) -> None:
    """ARM's decoder keys as star's, the decoder width permuted so star's own sin-cos embedding fits (`perm`
    checked by the caller)."""
    depth = model_args["decoder_depth"]
    dec = model_args["decoder_dim"]
    grid = model_args["img_size"] // model_args["patch_size"]
    perm = _sincos_permutation(dec, grid, state.pop("dec_pos_embed")[0])
    dropped["dec_pos_embed"] = "fixed sin-cos, which star computes itself (decoder width permuted to its column order)"
    if "mask" in state:
        dropped["mask"] = "the block-causal attention mask, which star builds itself from the cluster layout"
        state.pop("mask")

    def rows(t):  # the decoder's width is the output (rows of a weight)
        return t[perm]

    def cols(t):  # ... or the input (columns)
        return t[:, perm]

    out["mask_token"] = state.pop("ar_token")[..., perm]
    for k in range(depth):
        out[f"feature_norms.{k}.weight"] = state.pop(f"norm_{k + 1}.weight")
        out[f"feature_norms.{k}.bias"] = state.pop(f"norm_{k + 1}.bias")
    # ARM splits enc2dec's output as (dec, depth) and gives block k column k; star takes contiguous chunks
    weight, bias = state.pop("enc2dec.weight"), state.pop("enc2dec.bias")
    out["feature_proj.weight"] = weight.reshape(dec, depth, -1).transpose(0, 1).reshape(dec * depth, -1)
    out["feature_proj.bias"] = bias.reshape(dec, depth).t().reshape(-1)
    for i in range(depth):
        src, dst = f"dec_block.{i}.", f"decoder_blocks.{i}."
        for arm, ours, fix in (("norm2_1.weight", "norm_q.weight", rows), ("norm2_1.bias", "norm_q.bias", rows),
                               ("norm2_2.weight", "norm_kv.weight", None), ("norm2_2.bias", "norm_kv.bias", None),
                               ("attn2.q.weight", "q.weight", cols), ("attn2.q.bias", "q.bias", None),
                               ("attn2.kv.weight", "kv.weight", None), ("attn2.kv.bias", "kv.bias", None),
                               ("attn2.proj.weight", "proj.weight", rows), ("attn2.proj.bias", "proj.bias", rows),
                               ("norm2.weight", "norm2.weight", rows), ("norm2.bias", "norm2.bias", rows),
                               ("mlp.fc1.weight", "mlp.fc1.weight", cols), ("mlp.fc1.bias", "mlp.fc1.bias", None),
                               ("mlp.fc2.weight", "mlp.fc2.weight", rows), ("mlp.fc2.bias", "mlp.fc2.bias", rows)):
            value = state.pop(src + arm)
            out[dst + ours] = fix(value) if fix else value
    out["decoder_norm.weight"] = rows(state.pop("ar_norm.weight"))
    out["decoder_norm.bias"] = rows(state.pop("ar_norm.bias"))
    out["decoder_pred.weight"] = cols(state.pop("ar_pred.weight"))
    out["decoder_pred.bias"] = state.pop("ar_pred.bias")


def _decoder_mismatch(state: Mapping[str, torch.Tensor], args: dict, grid: int) -> Optional[str]:
    """Why star's decoder cannot hold ARM's exactly, or None when it can."""
    dec = state["ar_token"].shape[-1]
    if dec % ARM_HEAD_DIM:
        return f"decoder width {dec} is not a multiple of ARM's head width {ARM_HEAD_DIM}"
    if state["ar_pred.weight"].shape[0] != args["patch_size"] ** 2 * args["in_chans"]:
        return f"ar_pred predicts {state['ar_pred.weight'].shape[0]} values per patch, not the patch's pixels"
    if _sincos_permutation(dec, grid, state["dec_pos_embed"][0]) is None:
        return "dec_pos_embed is not the fixed sin-cos embedding ARM initialises"
    return None


def _pretrain(state: Dict[str, torch.Tensor], args: dict, dropped: Dict[str, str]) -> Tuple[nn.Module, dict]:
    grid = _grid(state["pos_embed"].shape[1], "pos_embed")
    model_args = dict(args, img_size=grid * args["patch_size"], cluster_size=ARM_CLUSTER_SIZE, num_images=1,
                      separator="none")
    out = {"patch_embed.proj.weight": state.pop("patch_embed.proj.weight"),
           "patch_embed.proj.bias": state.pop("patch_embed.proj.bias"), "pos_embed": state.pop("pos_embed")}
    _blocks(state, args["depth"], 1, out)
    why = _decoder_mismatch(state, args, grid)
    if why is None:
        dec = state["ar_token"].shape[-1]
        model_args.update(decoder_dim=dec, decoder_depth=len({k.split(".")[1] for k in state
                                                              if k.startswith("dec_block.")}),
                          decoder_num_heads=dec // ARM_HEAD_DIM,
                          decoder_mlp_ratio=state["dec_block.0.mlp.fc1.weight"].shape[0] / dec)
        _decoder(state, model_args, out, dropped)
        return StarPretrain(**model_args), out
    # the encoder is what fine-tuning reads: keep it, and let star's own decoder start fresh
    for key in [k for k in state if k.startswith(ARM_DECODER_KEYS)]:
        dropped[key] = f"{why}; star's decoder starts fresh"
        state.pop(key)
    model = StarPretrain(**model_args)
    fresh = {k: v for k, v in model.state_dict().items() if k not in out}
    if any(k.startswith(("blocks.", "patch_embed.", "pos_embed")) for k in fresh):
        raise ValueError(f"encoder weights missing from the conversion: {sorted(fresh)}")
    return model, {**out, **fresh}


def _finetuned(state: Dict[str, torch.Tensor], args: dict, global_pool: str) -> Tuple[nn.Module, dict]:
    pos = state.pop("pos_embed")
    num_patches = pos.shape[1] - 1
    grid, m = _grid(num_patches, "pos_embed without its cls row"), num_patches // 2
    model_args = dict(args, img_size=grid * args["patch_size"], num_classes=state["head.weight"].shape[0],
                      global_pool=global_pool, fc_norm=False)
    out = {"patch_embed.proj.weight": state.pop("patch_embed.proj.weight"),
           "patch_embed.proj.bias": state.pop("patch_embed.proj.bias"),
           "pos_embed": torch.cat([pos[:, :m], pos[:, m + 1:]], dim=1),
           "cls_token": state.pop("cls_token") + pos[:, m:m + 1],
           "norm.weight": state.pop("norm_f.weight"), "norm.bias": state.pop("norm_f.bias"),
           "head.weight": state.pop("head.weight"), "head.bias": state.pop("head.bias")}
    _blocks(state, args["depth"], 4, out)
    return VisionMambaClassifier(**model_args), out


def convert_arm(checkpoint: Checkpoint, out_dir: Union[str, Path, None] = None, global_pool: str = "avg",
                key: str = "model") -> Tuple[nn.Module, Dict[str, str]]:
    """An ARM pretraining or fine-tuned checkpoint as a star model, saved to `out_dir` when given (a model
    folder for `star.load_pretrained`, `star finetune --pretrained`, `star eval`). `global_pool` is how the
    fine-tuned model pooled: "avg" (ARM's recipe, `--global_pool True`) or "token" (`--cls_token`); the weights
    don't say. Returns (model, {ARM key: why it was dropped}); any key the map does not know stops it."""
    state = load_arm_state_dict(checkpoint, key)
    dropped: Dict[str, str] = {}
    try:
        args = _encoder_args(state)
        if "head.weight" in state:
            model, out = _finetuned(state, args, global_pool)
        elif "ar_token" in state:
            model, out = _pretrain(state, args, dropped)
        else:
            raise ValueError("neither a fine-tuned ARM model (head.weight) nor a pretraining one (ar_token)")
    except KeyError as err:
        raise ValueError(f"not an ARM checkpoint of a known layout: no {err.args[0]}") from None
    if state:
        raise ValueError(f"{len(state)} unknown ARM key(s), not converted (another ARM variant?): "
                         + ", ".join(sorted(state)))
    problems = {kind: keys for kind, keys in state_dict_mismatches(model, out).items() if keys}
    if problems:
        raise ValueError(f"converted weights do not fit {type(model).__name__}: {problems}")
    model.load_state_dict(out, strict=True)
    if out_dir is not None:
        _save(model, Path(out_dir))
    return model, dropped


def _save(model: nn.Module, out_dir: Path) -> None:
    """The model folder plus a run config saying how ARM prepared images for evaluation (ImageNet mean/std,
    the image resized to 256 x 256, centre crop 224), so `star eval` / `star predict` need no flags for it."""
    from star.config import TrainConfig, save_config
    from star.models.hub import RUN_CONFIG_FILE

    model.save_pretrained(out_dir)
    cfg = TrainConfig(task="finetune" if isinstance(model, VisionMambaClassifier) else "pretrain")
    size = [s for s, dims in SIZES.items()
            if (dims["embed_dim"], dims["depth"]) == (model.init_args["embed_dim"], model.init_args["depth"])]
    if size and model.init_args["patch_size"] == 16:
        cfg.model.name = (f"star_{size[0]}_patch16_224" if cfg.task == "finetune"
                          else f"star_pretrain_{size[0]}_patch16_192")
    cfg.data.mean_std, cfg.data.crop_pct, cfg.data.crop_mode = "imagenet", 224 / 256, "squash"
    save_config(cfg, out_dir / RUN_CONFIG_FILE)
