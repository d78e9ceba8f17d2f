"""ARM checkpoints -> star models. The state dicts below use ARM's key names and shapes (random weights), and
`arm_*` re-derive ARM's forward in plain PyTorch from its published code (models_pretrain.py,
Finetuning/models_mamba.py, mamba_simple.py), independently of star's kernels, as the expectation."""

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import star
from star import load_pretrained
from star.cli.main import main
from star.convert import convert_arm
from star.models import StarPretrain, VisionMambaClassifier, classifier_from_pretrain

DIM, D_STATE, D_CONV = 32, 8, 4
SUFFIXES = ("", "_b", "_c", "_c_b")


def mae_sincos(dim: int, grid: int) -> torch.Tensor:
    """MAE's get_2d_sincos_pos_embed (which ARM uses): [sin(w), cos(w), sin(h), cos(h)] per patch, w first."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    h, w = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                          indexing="ij")

    def one(pos):
        out = pos.reshape(-1, 1) * omega
        return torch.cat([out.sin(), out.cos()], dim=1)

    return torch.cat([one(w), one(h)], dim=1).float()[None]


def randn(*shape, scale=None, gen):
    scale = scale if scale is not None else 1 / math.sqrt(shape[-1])
    return torch.randn(*shape, generator=gen) * scale


def arm_state_dict(kind: str, depth: int, grid: int, patch: int, num_classes: int = 10, dec: int = 128,
                   seed: int = 0) -> dict:
    """Random weights in ARM's layout: 'pretrain' (VisionMamba of models_pretrain.py) or 'finetune' (ARM of
    Finetuning/models_mamba.py with bimamba_type v3)."""
    g = torch.Generator().manual_seed(seed)
    d, rank, hidden = DIM, math.ceil(DIM / 16), DIM * 4 * 2 // 3
    sd = {"patch_embed.proj.weight": randn(d, 3, patch, patch, scale=0.2, gen=g),
          "patch_embed.proj.bias": randn(d, scale=0.1, gen=g)}
    for i in range(depth):
        p = f"layers.{i}."
        sd.update({p + "norm1.weight": 1 + randn(d, scale=0.1, gen=g), p + "norm1.bias": randn(d, scale=0.1, gen=g),
                   p + "norm2.weight": 1 + randn(d, scale=0.1, gen=g), p + "norm2.bias": randn(d, scale=0.1, gen=g),
                   p + "mixer.in_proj.weight": randn(2 * d, d, gen=g), p + "mixer.out_proj.weight": randn(d, d, gen=g),
                   p + "mlp.w1.weight": randn(hidden, d, gen=g), p + "mlp.w1.bias": randn(hidden, scale=0.1, gen=g),
                   p + "mlp.w2.weight": randn(hidden, d, gen=g), p + "mlp.w2.bias": randn(hidden, scale=0.1, gen=g),
                   p + "mlp.w3.weight": randn(d, hidden, gen=g), p + "mlp.w3.bias": randn(d, scale=0.1, gen=g)})
        for s in SUFFIXES if kind == "finetune" else ("",):
            sd.update({p + f"mixer.conv1d{s}.weight": randn(d, 1, D_CONV, scale=0.5, gen=g),
                       p + f"mixer.conv1d{s}.bias": randn(d, scale=0.1, gen=g),
                       p + f"mixer.x_proj{s}.weight": randn(rank + 2 * D_STATE, d, gen=g),
                       p + f"mixer.dt_proj{s}.weight": randn(d, rank, gen=g),
                       p + f"mixer.dt_proj{s}.bias": -3 + randn(d, scale=0.5, gen=g),
                       p + f"mixer.A{s}_log": torch.log(torch.arange(1, D_STATE + 1.0)).repeat(d, 1)
                       + randn(d, D_STATE, scale=0.1, gen=g),
                       p + f"mixer.D{s}": 1 + randn(d, scale=0.1, gen=g)})
    if kind == "finetune":
        sd.update({"cls_token": randn(1, 1, d, scale=0.5, gen=g), "pos_embed": randn(1, grid * grid + 1, d, scale=0.5, gen=g),
                   "norm_f.weight": 1 + randn(d, scale=0.1, gen=g), "norm_f.bias": randn(d, scale=0.1, gen=g),
                   "head.weight": randn(num_classes, d, gen=g), "head.bias": randn(num_classes, scale=0.1, gen=g)})
        return sd
    sd.update({"pos_embed": mae_sincos(d, grid), "ar_token": randn(1, 1, dec, scale=0.5, gen=g),
               "dec_pos_embed": mae_sincos(dec, grid), "enc2dec.weight": randn(4 * dec, 4 * d, gen=g),
               "enc2dec.bias": randn(4 * dec, scale=0.1, gen=g), "ar_norm.weight": 1 + randn(dec, scale=0.1, gen=g),
               "ar_norm.bias": randn(dec, scale=0.1, gen=g), "ar_pred.weight": randn(patch * patch * 3, dec, gen=g),
               "ar_pred.bias": randn(patch * patch * 3, scale=0.1, gen=g), "mask": arm_mask(grid // 4 * (grid // 4) - 1, 16)})
    for k in range(1, 5):
        sd.update({f"norm_{k}.weight": 1 + randn(d, scale=0.1, gen=g), f"norm_{k}.bias": randn(d, scale=0.1, gen=g)})
    for i in range(4):
        p = f"dec_block.{i}."
        for name, shape in (("attn2.q", (dec, dec)), ("attn2.kv", (2 * dec, dec)), ("attn2.proj", (dec, dec)),
                            ("mlp.fc1", (4 * dec, dec)), ("mlp.fc2", (dec, 4 * dec))):
            sd[p + name + ".weight"] = randn(*shape, gen=g)
            sd[p + name + ".bias"] = randn(shape[0], scale=0.1, gen=g)
        for name in ("norm2_1", "norm2_2", "norm2"):
            sd[p + name + ".weight"] = 1 + randn(dec, scale=0.1, gen=g)
            sd[p + name + ".bias"] = randn(dec, scale=0.1, gen=g)
    return sd


def arm_mask(segments: int, tokens: int) -> torch.Tensor:
    """ARM's mask_generate: 0 where a query segment may read a key segment (same or earlier), -inf elsewhere."""
    allowed = torch.tril(torch.ones(segments, segments))
    mask = torch.zeros(segments, segments).masked_fill(allowed == 0, float("-inf"))
    return mask.repeat_interleave(tokens, 0).repeat_interleave(tokens, 1)


def arm_ssm(xz: torch.Tensor, sd: dict, p: str, s: str) -> torch.Tensor:
    """One direction of ARM's Mamba (mamba_inner_fn_no_out_proj) on xz (B, 2d, L): causal depthwise conv +
    SiLU, x_proj -> (dt, B, C), softplus(dt_proj(dt) + bias), the selective scan step by step, + D x, * SiLU(z)."""
    x, z = xz.chunk(2, dim=1)
    length = x.shape[-1]
    w = sd[f"{p}conv1d{s}.weight"]
    x = F.silu(F.conv1d(x, w, sd[f"{p}conv1d{s}.bias"], padding=w.shape[-1] - 1, groups=x.shape[1])[..., :length])
    dt, b, c = (x.transpose(1, 2) @ sd[f"{p}x_proj{s}.weight"].t()).split(
        [sd[f"{p}dt_proj{s}.weight"].shape[1], D_STATE, D_STATE], dim=-1)
    delta = F.softplus(dt @ sd[f"{p}dt_proj{s}.weight"].t() + sd[f"{p}dt_proj{s}.bias"])  # (B, L, d)
    a = -torch.exp(sd[f"{p}A{s}_log"])
    h, ys = torch.zeros(x.shape[0], x.shape[1], D_STATE, dtype=x.dtype), []
    for t in range(length):
        dt_t = delta[:, t, :, None]
        h = torch.exp(dt_t * a) * h + dt_t * b[:, t, None, :] * x[:, :, t, None]
        ys.append((h * c[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=-1) + sd[f"{p}D{s}"][:, None] * x
    return y * F.silu(z)


def arm_mixer_v3(hidden: torch.Tensor, sd: dict, p: str) -> torch.Tensor:
    """ARM's fine-tuning mixer (bimamba_type v3): rows, reversed rows, columns with the cls token kept at L // 2,
    reversed columns; (sum) / 4, then out_proj."""
    xz = (hidden @ sd[p + "in_proj.weight"].t()).transpose(1, 2)  # b d l
    b, d2, length = xz.shape
    tp, g = length // 2, int(math.sqrt(length))

    def to_columns(t):
        cls, rest = t[..., tp:tp + 1], torch.cat([t[..., :tp], t[..., tp + 1:]], dim=-1)
        rest = rest.reshape(b, t.shape[1], g, g).permute(0, 1, 3, 2).reshape(b, t.shape[1], -1)
        return torch.cat([rest[..., :tp], cls, rest[..., tp:]], dim=-1)

    out = arm_ssm(xz, sd, p, "") + arm_ssm(xz.flip(-1), sd, p, "_b").flip(-1)
    xc = to_columns(xz)
    out_c = arm_ssm(xc, sd, p, "_c") + arm_ssm(xc.flip(-1), sd, p, "_c_b").flip(-1)
    out_c = to_columns(out_c)  # the transpose is its own inverse on a square grid
    return ((out + out_c) / 4).transpose(1, 2) @ sd[p + "out_proj.weight"].t()


def arm_block(h: torch.Tensor, sd: dict, i: int, mixer) -> torch.Tensor:
    p = f"layers.{i}."
    ln = lambda x, n: F.layer_norm(x, x.shape[-1:], sd[p + n + ".weight"], sd[p + n + ".bias"])  # noqa: E731
    h = h + mixer(ln(h, "norm1"), sd, p + "mixer.")
    x = ln(h, "norm2")
    lin = lambda x, n: F.linear(x, sd[p + f"mlp.{n}.weight"], sd[p + f"mlp.{n}.bias"])  # noqa: E731
    return h + lin(F.silu(lin(x, "w1")) * lin(x, "w2"), "w3")


def arm_patches(images: torch.Tensor, sd: dict) -> torch.Tensor:
    w = sd["patch_embed.proj.weight"]
    return F.conv2d(images, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)


def arm_classify(images: torch.Tensor, sd: dict, depth: int, global_pool: bool) -> torch.Tensor:
    """Finetuning/models_mamba.py ARM.forward: cls inserted at M // 2, pos_embed added to all tokens, blocks,
    norm_f on every token, mean of the two sides (global_pool) or the cls token, head."""
    x = arm_patches(images, sd)
    tp = x.shape[1] // 2
    x = torch.cat([x[:, :tp], sd["cls_token"].expand(x.shape[0], -1, -1), x[:, tp:]], dim=1) + sd["pos_embed"]
    for i in range(depth):
        x = arm_block(x, sd, i, arm_mixer_v3)
    x = F.layer_norm(x, x.shape[-1:], sd["norm_f.weight"], sd["norm_f.bias"])
    x = (x[:, :tp].mean(1) + x[:, tp + 1:].mean(1)) / 2 if global_pool else x[:, tp]
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def to_clusters(x: torch.Tensor, grid: int) -> torch.Tensor:
    """einops "b (h p1) (w p2) c -> b (h w) (p1 p2) c" with p1 = p2 = 4, as ARM serializes."""
    b, _, c = x.shape
    x = x.reshape(b, grid // 4, 4, grid // 4, 4, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (grid // 4) ** 2, 16, c)


def arm_pretrain(images: torch.Tensor, sd: dict, grid: int, patch: int, heads: int):
    """models_pretrain.py VisionMamba.forward: (predictions, normalized targets) of clusters 2..9."""
    b = images.shape[0]
    x = to_clusters(arm_patches(images, sd) + sd["pos_embed"], grid)[:, :-1].reshape(b, -1, DIM)

    def mixer(h, sd, p):
        return arm_ssm((h @ sd[p + "in_proj.weight"].t()).transpose(1, 2), sd, p, "").transpose(1, 2) \
            @ sd[p + "out_proj.weight"].t()

    features = []
    for i in range(12):
        x = arm_block(x, sd, i, mixer)
        if i + 1 in (6, 8, 10, 12):
            k = len(features) + 1
            features.append(F.layer_norm(x, (DIM,), sd[f"norm_{k}.weight"], sd[f"norm_{k}.bias"]))
    latent = F.linear(torch.cat(features, -1), sd["enc2dec.weight"], sd["enc2dec.bias"])
    latent = latent.reshape(b, latent.shape[1], -1, 4)
    dec = sd["ar_token"].shape[-1]
    q = to_clusters(sd["ar_token"] + sd["dec_pos_embed"], grid)[:, 1:].reshape(1, -1, dec).repeat(b, 1, 1)
    for i in range(4):
        p = f"dec_block.{i}."
        lin = lambda x, n: F.linear(x, sd[p + n + ".weight"], sd[p + n + ".bias"])  # noqa: E731
        ln = lambda x, n: F.layer_norm(x, (dec,), sd[p + n + ".weight"], sd[p + n + ".bias"])  # noqa: E731
        n = q.shape[1]
        qh = lin(ln(q, "norm2_1"), "attn2.q").reshape(b, n, heads, dec // heads).transpose(1, 2)
        kv = lin(ln(latent[..., i], "norm2_2"), "attn2.kv").reshape(b, n, 2, heads, dec // heads).permute(2, 0, 3, 1, 4)
        attn = (qh @ kv[0].transpose(-2, -1) * (dec // heads) ** -0.5 + sd["mask"]).softmax(-1)
        q = q + lin((attn @ kv[1]).transpose(1, 2).reshape(b, n, dec), "attn2.proj")
        q = q + lin(F.gelu(lin(ln(q, "norm2"), "mlp.fc1")), "mlp.fc2")
    pred = F.linear(F.layer_norm(q, (dec,), sd["ar_norm.weight"], sd["ar_norm.bias"]), sd["ar_pred.weight"],
                    sd["ar_pred.bias"])
    target = images.reshape(b, 3, grid, patch, grid, patch).permute(0, 2, 4, 3, 5, 1).reshape(b, grid * grid, -1)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    target = to_clusters(target, grid)[:, 1:].reshape(b, -1, target.shape[-1])
    return pred, target


def save_arm(tmp_path, sd, name="checkpoint-99.pth", model_ema=None):
    """As ARM's misc.save_model writes it: the model beside the run's argparse options, the epoch and (in
    fine-tuning) the EMA weights and best accuracies."""
    path = tmp_path / name
    ckpt = {"model": sd, "epoch": 99, "args": argparse.Namespace(model="arm_base_pz16", blr=5e-4)}
    if model_ema is not None:
        ckpt.update(model_ema=model_ema, max_accuracy=83.1, ema_max_accuracy=83.2)
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("global_pool", ["avg", "token"])
def test_finetuned_arm_checkpoint_gives_arms_logits(tmp_path, global_pool):
    sd = arm_state_dict("finetune", depth=2, grid=4, patch=4)
    model, dropped = convert_arm(save_arm(tmp_path, sd), tmp_path / "arm-ft", global_pool=global_pool)
    assert dropped == {} and star.convert_arm is convert_arm
    loaded = load_pretrained(tmp_path / "arm-ft").eval()  # strict: nothing missing or unexpected
    assert isinstance(loaded, VisionMambaClassifier) and loaded.init_args["fc_norm"] is False
    assert (loaded.img_size, loaded.num_classes, len(loaded.blocks)) == (16, 10, 2)
    images = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = arm_classify(images, sd, depth=2, global_pool=global_pool == "avg")
        torch.testing.assert_close(loaded(images), expected, rtol=1e-4, atol=1e-5)
    # the directions are distinct: swapping two of them changes the logits (the test can see a mix-up)
    swapped = dict(sd)
    for name in ("conv1d{}.weight", "x_proj{}.weight"):
        swapped["layers.0.mixer." + name.format("_c")] = sd["layers.0.mixer." + name.format("_c_b")]
        swapped["layers.0.mixer." + name.format("_c_b")] = sd["layers.0.mixer." + name.format("_c")]
    with torch.no_grad():
        assert not torch.allclose(convert_arm({"model": swapped}, global_pool=global_pool)[0].eval()(images),
                                  expected, atol=1e-4)


def test_pretraining_arm_checkpoint_gives_arms_predictions(tmp_path):
    sd = arm_state_dict("pretrain", depth=12, grid=12, patch=4, dec=512)  # ARM's decoder width: 8 heads
    model, dropped = convert_arm(save_arm(tmp_path, sd), tmp_path / "arm-pre")
    assert set(dropped) == {"dec_pos_embed", "mask"}
    loaded = load_pretrained(tmp_path / "arm-pre").eval()
    assert isinstance(loaded, StarPretrain)
    assert loaded.init_args["separator"] == "none" and loaded.init_args["num_images"] == 1
    assert loaded.feature_layers == [6, 8, 10, 12] and loaded.init_args["decoder_num_heads"] == 8
    images = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        pred, target = arm_pretrain(images, sd, grid=12, patch=4, heads=8)
        out = loaded(images[:, None])
    torch.testing.assert_close(out["target"][:, 0], target, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out["pred"][:, 0], pred, rtol=1e-4, atol=1e-4)
    # and it seeds a classifier like any STAR pretraining run
    clf, report = classifier_from_pretrain(tmp_path / "arm-pre", img_size=56, num_classes=3)
    assert set(report.missing_keys) == {"cls_token", "fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert "mask_token" in report.unexpected_keys and clf.pos_embed.shape == (1, 196, DIM)


def test_pos_embed_interpolation_is_arms(tmp_path):
    """ARM's interpolate_pos_embed: bicubic, align_corners=False, no antialiasing (12x12 -> 14x14)."""
    sd = arm_state_dict("pretrain", depth=12, grid=12, patch=4)
    sd["pos_embed"] = torch.randn(1, 144, DIM)
    convert_arm({"model": sd}, tmp_path / "pre")
    clf, _ = classifier_from_pretrain(tmp_path / "pre", img_size=56, num_classes=3)
    grid = sd["pos_embed"].reshape(1, 12, 12, DIM).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(clf.pos_embed, expected.reshape(1, 196, DIM))


def test_a_decoder_star_cannot_reproduce_is_dropped_and_the_encoder_kept(tmp_path, capsys):
    sd = arm_state_dict("pretrain", depth=12, grid=12, patch=4)
    exact, _ = convert_arm(dict(sd))
    learned = {**sd, "dec_pos_embed": torch.randn_like(sd["dec_pos_embed"])}  # not ARM's fixed sin-cos
    model, dropped = convert_arm(learned)
    decoder = {k for k in sd if k.startswith(("ar_", "dec_", "enc2dec", "norm_", "mask"))}
    assert set(dropped) == decoder and len(decoder) == 81
    assert all("not the fixed sin-cos" in why and "starts fresh" in why for why in dropped.values())
    for key, value in exact.state_dict().items():
        if key.startswith(("blocks.", "patch_embed.", "pos_embed")):
            assert torch.equal(model.state_dict()[key], value), key
    assert main(["convert", "arm", str(save_arm(tmp_path, learned)), "--out", str(tmp_path / "enc")]) == 0
    line = capsys.readouterr().out.splitlines()[1]
    assert line.startswith("dropped ") and "... (81 keys): dec_pos_embed is not the fixed sin-cos" in line
    assert isinstance(load_pretrained(tmp_path / "enc"), StarPretrain)


def test_unknown_missing_and_unreadable_checkpoints_stop_it(tmp_path):
    sd = arm_state_dict("finetune", depth=1, grid=4, patch=4)
    with pytest.raises(ValueError, match=r"2 unknown ARM key\(s\).*: layers\.0\.mixer\.gamma, rope\.freqs"):
        convert_arm({**sd, "layers.0.mixer.gamma": torch.ones(DIM), "rope.freqs": torch.ones(3)})
    del sd["layers.0.mixer.D_c_b"]
    with pytest.raises(ValueError, match="no layers.0.mixer.D_c_b"):
        convert_arm(sd)
    with pytest.raises(ValueError, match="no state dict under 'model'"):
        convert_arm({"model_ema": 3, "epoch": 1})
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a checkpoint torch can read safely"):
        convert_arm(junk)
    with pytest.raises(FileNotFoundError):
        convert_arm(tmp_path / "missing.pth")


def test_convert_command_then_eval_and_finetune(tmp_path, capsys):
    ema = arm_state_dict("finetune", depth=2, grid=4, patch=4, seed=5)
    ft = save_arm(tmp_path, arm_state_dict("finetune", depth=2, grid=4, patch=4), "ft.pth", model_ema=ema)
    assert main(["convert", "arm", str(ft), "--out", str(tmp_path / "arm-ft")]) == 0
    out = capsys.readouterr().out
    assert "fine-tuned ARM checkpoint -> VisionMambaClassifier" in out and "nothing dropped" in out
    assert main(["convert", "arm", str(ft), "--out", str(tmp_path / "arm-ema"), "--key", "model_ema",
                 "--global_pool", "token"]) == 0
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load_pretrained(tmp_path / "arm-ema").eval()(images),
                                   arm_classify(images, ema, depth=2, global_pool=False), rtol=1e-4, atol=1e-5)
    # the folder says how ARM prepares images for evaluation: Finetuning/util/datasets.py build_transform
    from torchvision import transforms as T

    from star.build import classification_transform
    from star.models.hub import RUN_CONFIG_FILE
    from star.config import load_config

    cfg = load_config(str(tmp_path / "arm-ft" / RUN_CONFIG_FILE))
    arm_eval = T.Compose([T.Resize((256, 256), interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224),
                          T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 420, 3), dtype=np.uint8))
    torch.testing.assert_close(classification_transform(cfg, 224, 3, train=False)(image), arm_eval(image))
    synthetic = ["--data.dataset", "synthetic", "--data.num_workers", "0", "--device", "cpu"]
    assert main(["eval", str(tmp_path / "arm-ft"), *synthetic]) == 0
    assert "test: 256 images, top-1" in capsys.readouterr().out
    pre = save_arm(tmp_path, arm_state_dict("pretrain", depth=12, grid=12, patch=4), "pre.pth")
    assert main(["convert", "arm", str(pre), "--out", str(tmp_path / "arm-pre")]) == 0
    assert "dropped dec_pos_embed: fixed sin-cos" in capsys.readouterr().out
    geometry = ["--model.embed_dim", "32", "--model.depth", "12", "--model.img_size", "48", "--model.patch_size", "4",
                "--model.in_chans", "3", "--data.mean_std", "imagenet", "--model.num_classes", "10",
                "--model.scan_impl", "chunked", "--data.num_samples", "16", "--data.val_size", "8",
                "--optim.batch_size", "8", "--max_steps", "1", "--data.auto_augment", "none"]
    assert main(["finetune", "--pretrained", str(tmp_path / "arm-pre"), *geometry, *synthetic,
                 "--output_dir", str(tmp_path / "ft-run")]) == 0
    assert "initialised from" in capsys.readouterr().out
    assert main(["convert", "arm", str(tmp_path / "nothing.pth"), "--out", str(tmp_path / "x")]) == 2
    assert "no checkpoint file" in capsys.readouterr().err
