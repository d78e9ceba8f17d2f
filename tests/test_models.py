import json
import math

import pytest
import torch
import torch.nn.functional as F

import star
from star.models import StarPretrain, VisionMambaClassifier, classifier_from_pretrain, create_model, load_pretrained
from star.models.classifier import column_order
from star.models.patches import cluster_order, normalize_patches, patchify, unpatchify

# 16 px grayscale, patch 4 -> 4x4 grid, clusters of 2x2 patches -> 4 clusters of 4 tokens per image
TINY = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=4, cluster_size=2, decoder_dim=32,
            decoder_num_heads=4, scan_impl="chunked")
TINY_CLF = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=4, scan_impl="chunked")


def tiny_pretrain(**kw):
    torch.manual_seed(0)
    return StarPretrain(**{**TINY, **kw}).eval()


def images(b=2, k=4, c=1, size=16, seed=0):
    return torch.randn(b, k, c, size, size, generator=torch.Generator().manual_seed(seed))


def test_cluster_order_is_clusters_then_patches_in_raster_order():
    # 4x4 grid, 2x2 clusters: cluster 0 = patches 0,1,4,5; cluster 1 = 2,3,6,7; ...
    assert cluster_order(4, 2).tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]
    with pytest.raises(ValueError, match="cluster"):
        cluster_order(6, 4)


def test_column_order_keeps_cls_in_the_middle():
    # patches 0 1 / 2 3 with cls between p1 and p2: sequence [p0, p1, cls, p2, p3]; columns visit p0 p2 p1 p3
    assert column_order(2, cls_pos=2).tolist() == [0, 3, 2, 1, 4]
    assert sorted(column_order(5, cls_pos=12).tolist()) == list(range(26))


def test_patchify_roundtrip():
    x = torch.randn(3, 2, 8, 8)
    assert torch.equal(unpatchify(patchify(x, 4), 4, 2), x)


def test_normalize_patches_per_patch_unbiased():
    patches = torch.randn(2, 5, 16, dtype=torch.float64) * torch.rand(2, 5, 1, dtype=torch.float64) * 3 + 7
    out = normalize_patches(patches, eps=0.0)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 5, dtype=torch.float64))
    torch.testing.assert_close(out.std(-1, unbiased=True), torch.ones(2, 5, dtype=torch.float64))
    flat = torch.full((1, 1, 16), 3.0)  # a constant patch: eps keeps it finite (all zeros), never NaN
    assert torch.equal(normalize_patches(flat), torch.zeros_like(flat))


def test_separators_identical_and_before_each_image():
    model = tiny_pretrain()
    seq = model.build_sequence(images())
    per_image = model.separator_len + 16
    assert model.separator_len == 4 and seq.shape == (2, 4 * per_image, 32)
    for k in range(4):
        sep = seq[:, k * per_image:k * per_image + model.separator_len]
        assert torch.equal(sep, model.separator.expand_as(sep))
    # no separator token anywhere else: image tokens carry a position embedding
    image_tokens = torch.cat([seq[:, k * per_image + 4:(k + 1) * per_image] for k in range(4)], 1)
    assert not torch.isclose(image_tokens, model.separator, atol=1e-6).all(-1).any()


@pytest.mark.parametrize("separator,sep_len", [("cluster", 4), ("token", 1), ("fixed", 4), ("none", 0)])
def test_separator_modes(separator, sep_len):
    model = tiny_pretrain(separator=separator, separator_value=0.5)
    out = model(images(k=2))
    assert model.separator_len == sep_len
    assert out["pred"].shape == out["target"].shape == (2, 2, 16 if sep_len else 12, 16)
    learned = [n for n, _ in model.named_parameters() if n == "separator"]
    assert learned == (["separator"] if separator in ("cluster", "token") else [])
    if separator == "fixed":
        assert torch.all(model.separator == 0.5)


def test_targets_and_loss_on_a_hand_checked_example():
    # 4x4 image, patch 2, one patch per cluster, ARM (K=1, no separator): patches 2..4 are predicted
    model = StarPretrain(img_size=4, patch_size=2, in_chans=1, embed_dim=16, depth=2, cluster_size=1,
                         num_images=1, separator="none", decoder_dim=16, decoder_num_heads=2, scan_impl="ref")
    img = torch.arange(16.0).reshape(1, 1, 1, 4, 4)
    target = model.targets(img)
    # patch 1 (top right) holds pixels 2, 3, 6, 7: mean 4.5, unbiased variance (6.25+2.25+2.25+6.25)/3 = 17/3
    expected = (torch.tensor([2.0, 3.0, 6.0, 7.0]) - 4.5) / math.sqrt(17 / 3 + 1e-6)
    assert target.shape == (1, 1, 3, 4)
    assert torch.allclose(target[0, 0, 0], expected)
    # a decoder that predicts 0 everywhere costs the mean squared target: 3/4 * var / (var + eps) per patch
    torch.nn.init.zeros_(model.decoder_pred.weight)
    torch.nn.init.zeros_(model.decoder_pred.bias)
    assert torch.allclose(model(img)["loss"], torch.tensor(0.75), atol=1e-6)
    # STAR with a separator predicts the first cluster too
    star_model = StarPretrain(**{**model.init_args, "separator": "cluster", "num_images": 2})
    assert star_model.targets(img.repeat(1, 2, 1, 1, 1)).shape == (1, 2, 4, 4)


def test_encoder_is_causal():
    model = tiny_pretrain()
    seq = model.build_sequence(images())
    cut = 37
    later = seq.clone()
    later[:, cut:] += torch.randn_like(later[:, cut:])
    a, b = model.forward_features(seq)[-1], model.forward_features(later)[-1]
    assert torch.allclose(a[:, :cut], b[:, :cut], atol=1e-6)
    assert not torch.allclose(a[:, cut:], b[:, cut:], atol=1e-3)


@pytest.mark.parametrize("separator", ["cluster", "none"])
def test_predictions_never_see_the_future(separator):
    model = tiny_pretrain(separator=separator)
    x = images()
    base = model(x)["pred"]
    # change cluster 2 (patches 8, 9, 12, 13 in raster order -> rows 2-3, cols 0-1) of image 1
    changed = x.clone()
    changed[:, 1, :, 8:16, 0:8] += 1.0
    pred = model(changed)["pred"]
    per_cluster = 4
    first_changed = (2 if separator == "cluster" else 1) * per_cluster  # target index of cluster 2 in image 1
    assert torch.allclose(pred[:, 0], base[:, 0], atol=1e-6)  # earlier image untouched
    # clusters up to and including the changed one are predicted from earlier context only
    assert torch.allclose(pred[:, 1, :first_changed + per_cluster], base[:, 1, :first_changed + per_cluster],
                          atol=1e-6)
    assert not torch.allclose(pred[:, 1, first_changed + per_cluster:], base[:, 1, first_changed + per_cluster:],
                              atol=1e-4)
    assert not torch.allclose(pred[:, 2:], base[:, 2:], atol=1e-4)  # later images do see it


@pytest.mark.parametrize("cls_token", [False, True])
def test_decoder_windows_are_one_model_at_one_image(cls_token):
    image = tiny_pretrain(num_images=1, cls_token=cls_token)
    sequence = StarPretrain(**{**image.init_args, "decoder_window": "sequence"}).eval()
    sequence.load_state_dict(image.state_dict())
    x = images(k=1)
    assert image.decoder_window == "image" and sequence.decoder_window == "sequence"
    torch.testing.assert_close(image(x)["pred"], sequence(x)["pred"], rtol=0, atol=1e-6)


def test_image_window_reads_only_its_own_images_tokens():
    """Perturb the encoder features of image 0 only: with the image window, image 1's predictions stay."""
    for window, image1_changes in (("image", False), ("sequence", True)):
        model = tiny_pretrain(decoder_window=window)
        features = model.forward_features(model.build_sequence(images(k=2)))
        image_len = model.separator_len + model.grid ** 2
        changed = [f.clone() for f in features]
        for f in changed:
            f[:, :image_len] += torch.randn_like(f[:, :image_len])
        base, pred = (model.forward_decoder(f, 2).reshape(2, 2, -1, 16) for f in (features, changed))
        assert not torch.allclose(pred[:, 0], base[:, 0], atol=1e-4)
        assert torch.allclose(pred[:, 1], base[:, 1], atol=1e-6) != image1_changes, window


def test_decoder_attention_work_per_image_is_the_same_at_every_k(monkeypatch):
    """What reaches SDPA: with the image window, queries x keys per image and the mask do not grow with K
    (the sequence window, checked alongside, grows linearly per image)."""
    import star.models.star as star_module
    calls, sdpa = [], star_module.F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, attn_mask=None):
        calls.append((q.shape[:-1].numel() * k.shape[-2], attn_mask.numel()))
        return sdpa(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr(star_module.F, "scaled_dot_product_attention", recording_sdpa)
    work = {}
    for window in ("image", "sequence"):
        for k in (1, 4, 16, 64):
            model = tiny_pretrain(depth=1, decoder_depth=1, num_images=k, decoder_window=window)
            calls.clear()
            with torch.no_grad():
                model(images(b=1, k=k))
            (scores, mask_size), = calls
            work[window, k] = (scores / k, mask_size)
    assert {work["image", k] for k in (1, 4, 16, 64)} == {work["image", 1]}
    assert work["sequence", 64][0] == 64 * work["sequence", 1][0]


def test_first_cluster_predicted_only_with_separator():
    with_sep, without = tiny_pretrain(separator="token"), tiny_pretrain(separator="none")
    assert with_sep.layout(3).target_pos.tolist() == list(range(16))
    assert without.layout(3).target_pos.tolist() == list(range(4, 16))


@pytest.mark.parametrize("task", ["pretrain", "finetune"])
def test_training_step_compiles_once(task):
    """A second training step reuses the first step's graph (a layout cache filled inside forward made
    torch.compile trace the pretraining step twice)."""
    torch._dynamo.reset()
    if task == "pretrain":
        model = tiny_pretrain().train()
        batch, loss = images(k=model.num_images), lambda out: out["loss"]
    else:
        model = VisionMambaClassifier(**TINY_CLF, num_classes=3).train()
        batch, loss = images(k=1)[:, 0], lambda out: out.logsumexp(-1).mean()
    compiled = torch.compile(model, backend="eager")
    loss(compiled(batch)).backward()
    with torch._dynamo.config.patch(error_on_recompile=True):
        loss(compiled(batch)).backward()


@pytest.mark.parametrize("size,params", [("tiny", 6e6), ("base", 85e6), ("large", 297e6)])
def test_parameter_counts_match_the_spec(size, params):
    with torch.device("meta"):
        model = create_model(f"star_{size}_patch16_224")
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - params) / params < 0.03, count


def test_registry_and_timm():
    import timm

    assert "star_pretrain_base_patch16_192" in star.list_models() and "star_huge_patch16_224" in star.list_models()
    assert isinstance(timm.create_model("star_tiny_patch16_224", **TINY_CLF, num_classes=3),
                      VisionMambaClassifier)
    model = create_model("star_pretrain_tiny_patch16_192", **TINY)
    assert isinstance(model, StarPretrain) and model.init_args["embed_dim"] == 32
    with pytest.raises(ValueError, match="unknown model"):
        create_model("star_tiny_patch16_193")
    with pytest.raises(ValueError, match="star_pretrain_tiny_patch16_192"):
        create_model("star_pretrain_tiny_patch16_192", not_an_argument=1)


def test_renamed_pretraining_models_still_build_with_a_warning(tmp_path):
    import timm

    from star.build import build_model
    from star.config import TrainConfig, load_config, save_config

    assert "star_tiny_patch16_192" not in star.list_models()  # listed under today's name only
    for build in (create_model, timm.create_model):
        with pytest.warns(Warning, match="star_pretrain_tiny_patch16_192"):
            assert isinstance(build("star_tiny_patch16_192", **TINY), StarPretrain)
    cfg = TrainConfig()  # a run config saved before the rename names the old model
    cfg.model.name = "star_tiny_patch16_192"
    for key, value in TINY.items():
        setattr(cfg.model, key, value)
    save_config(cfg, tmp_path / "config.yaml")
    with pytest.warns(FutureWarning, match="renamed"):
        assert isinstance(build_model(load_config(str(tmp_path / "config.yaml"))), StarPretrain)


def test_bad_images_give_clear_errors():
    model = tiny_pretrain()
    with pytest.raises(ValueError, match="1-channel images, got 3"):
        model(images(c=3))
    with pytest.raises(ValueError, match="16x16 images, got 20x20"):
        model(images(size=20))
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(2, 1, 16, 16))
    with pytest.raises(ValueError, match="empty"):
        model(images(k=4)[:, :0])
    with pytest.raises(ValueError, match="floating-point"):
        model((images() * 50).to(torch.uint8))
    with pytest.raises(ValueError, match="float64 but the model's weights are torch.float32"):
        model(images().double())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the conv casts for itself
        assert torch.isfinite(model(images().bfloat16())["loss"])


def test_bad_model_arguments_fail_at_construction():
    with pytest.raises(ValueError, match="scan_impl must be one of"):
        VisionMambaClassifier(**{**TINY_CLF, "scan_impl": "cuda"})
    with pytest.raises(ValueError, match="1x1 patch grid is too small"):
        VisionMambaClassifier(**{**TINY_CLF, "img_size": 4, "patch_size": 4})
    with pytest.raises(ValueError, match="nothing to predict"):
        StarPretrain(**{**TINY, "cluster_size": 4, "separator": "none", "num_images": 1})
    with pytest.raises(ValueError, match="cluster_size and decoder_depth"):
        StarPretrain(**{**TINY, "cluster_size": 0})
    with pytest.raises(ValueError, match="unknown argument"):
        create_model("star_tiny_patch16_224", **TINY_CLF, not_an_argument=1)


def test_reset_classifier_like_timm(tmp_path):
    model = VisionMambaClassifier(**TINY_CLF, num_classes=3)
    model.reset_classifier(7)
    assert model.num_features == 32 and model(torch.randn(2, 1, 16, 16)).shape == (2, 7)
    model.save_pretrained(tmp_path / "m")
    assert load_pretrained(tmp_path / "m").num_classes == 7  # the new head is what is saved
    model.reset_classifier(0)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 32)  # features


def test_finetune_takes_the_input_size_of_its_model_name(tmp_path):
    from star.build import build_model
    from star.config import apply_overrides, load_config

    tiny_pretrain().save_pretrained(tmp_path / "run" / "model")  # a run directory, as `star pretrain` leaves it
    clf, _ = classifier_from_pretrain(tmp_path / "run", num_classes=3)  # run dirs load like model folders
    assert clf.img_size == 16
    geometry = ["--model.patch_size", "4", "--model.in_chans", "1", "--model.embed_dim", "32", "--model.depth", "4"]
    cfg = apply_overrides(load_config("imagenet-base", "finetune"), ["--pretrained", str(tmp_path / "run"), *geometry])
    assert build_model(cfg).img_size == 224  # star_base_patch16_224: pretrained at 16 px, fine-tuned at 224
    assert build_model(apply_overrides(cfg, ["--model.img_size", "32"])).img_size == 32
    with pytest.raises(ValueError, match="model.decoder_depth, model.separator: not an argument of the classifier"):
        build_model(apply_overrides(cfg, ["--model.separator", "token", "--model.decoder_depth", "2"]))  # not dropped


def test_pretrain_to_classifier_transfer(tmp_path):
    pretrain = tiny_pretrain(cls_token=True)
    pretrain.save_pretrained(tmp_path / "pre")
    clf, report = classifier_from_pretrain(tmp_path / "pre", img_size=24, num_classes=5)
    assert clf.pos_embed.shape == (1, 36, 32)  # 4x4 grid interpolated to 6x6
    pre_state = pretrain.state_dict()
    for name, value in clf.state_dict().items():
        if ".mixer.directions." in name:
            src = name.replace(".directions." + name.split(".directions.")[1].split(".")[0] + ".", ".directions.0.")
            assert torch.equal(value, pre_state[src]), name
        elif name in pre_state and name != "pos_embed":
            assert torch.equal(value, pre_state[name]), name
    assert set(report.missing_keys) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    assert "separator" in report.unexpected_keys and any(k.startswith("decoder_") for k in report.unexpected_keys)
    assert clf(torch.randn(2, 1, 24, 24)).shape == (2, 5)
    with pytest.raises(ValueError, match="does not fit"):
        classifier_from_pretrain(pretrain, embed_dim=48)


def test_classifier_directions_and_pooling():
    torch.manual_seed(0)
    clf = VisionMambaClassifier(**TINY_CLF, num_classes=3)
    assert len(clf.blocks[0].mixer.directions) == 4
    x = torch.randn(2, 1, 16, 16)
    assert clf(x).shape == (2, 3)
    # every direction contributes: the last patch influences the first token through the backward scans
    feats = clf.forward_features(x)
    x2 = x.clone()
    x2[..., 12:, 12:] += 1
    assert not torch.allclose(clf.forward_features(x2)[:, 0], feats[:, 0], atol=1e-5)
    groups = clf.group_matcher()
    assert "stem" in groups and "blocks" in groups
    assert {n for n in clf.no_weight_decay() if n.endswith("A_log")}


def per_direction_mixer(mixer, x, orders):
    """The mixer written one direction at a time: permuted copy, reverse-flag conv and scan, outputs put back."""
    import torch.nn.functional as F

    from star.ops import causal_conv1d, selective_scan

    u, z = mixer.in_proj(x).chunk(2, dim=-1)
    y = 0
    for ssm, (perm, reverse) in zip(mixer.directions, orders):
        up, zp = u[:, perm], z[:, perm]
        c = causal_conv1d(up, ssm.conv1d.weight[:, 0], ssm.conv1d.bias, activation="silu", reverse=reverse, impl="ref")
        dt, B, C = ssm.x_proj(c).split([ssm.dt_rank, ssm.d_state, ssm.d_state], dim=-1)
        out = selective_scan(c, F.linear(dt, ssm.dt_proj.weight), -torch.exp(ssm.A_log), B, C, ssm.D, z=zp,
                             delta_bias=ssm.dt_proj.bias, reverse=reverse, impl="ref")
        y = y + torch.empty_like(out).index_copy_(1, perm, out)
    return mixer.out_proj(y / len(orders))


def test_batched_directions_match_one_direction_at_a_time():
    """The mixer runs its 4 directions as one grouped batch with reversals folded into the gather; the
    plain per-direction form (reverse flags, a permuted copy per direction) must give the same outputs
    and gradients."""
    from star.models.mamba import MambaMixer, scan_orders

    torch.manual_seed(0)
    mixer = MambaMixer(8, d_state=4, num_directions=4, scan_impl="ref").double()
    for p in mixer.parameters():  # directions must differ, or a mix-up of their parameters would go unseen
        p.data += 0.1 * torch.randn_like(p)
    x = torch.randn(3, 7, 8, dtype=torch.float64, requires_grad=True)
    rows, cols = torch.arange(7), torch.tensor([0, 3, 6, 1, 4, 2, 5])
    orders = [(rows, False), (rows, True), (cols, False), (cols, True)]
    batched = mixer(x, scan_orders([rows, rows.flip(0), cols, cols.flip(0)]))
    plain = per_direction_mixer(mixer, x, orders)
    torch.testing.assert_close(batched, plain, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(batched)
    params = [x, *mixer.parameters()]
    for a, b in zip(torch.autograd.grad((batched * w).sum(), params), torch.autograd.grad((plain * w).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="needs its scan orders"):
        mixer(x)
    with pytest.raises(ValueError, match="permutation"):
        scan_orders([rows, rows.clamp(max=5)])


def test_save_and_load_pretrained(tmp_path):
    model = tiny_pretrain()
    x = images(k=2)
    model.save_pretrained(tmp_path / "m")
    loaded = load_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, StarPretrain)
    assert torch.equal(model(x)["pred"], loaded(x)["pred"])
    with pytest.raises(ValueError, match="not a VisionMambaClassifier"):
        VisionMambaClassifier.from_pretrained(tmp_path / "m")
    # saved before decoder_window existed: loads with the whole-sequence window it was trained with
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    del config["decoder_window"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    assert load_pretrained(tmp_path / "m").decoder_window == "sequence"
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_pretrained(tmp_path / "nothing")
    # weights of another size: every mismatched key is named
    other = StarPretrain(**{**model.init_args, "embed_dim": 48})
    other.save_pretrained(tmp_path / "other")
    (tmp_path / "other" / "config.json").write_text((tmp_path / "m" / "config.json").read_text())
    with pytest.raises(ValueError, match=r"mismatched keys: blocks.0.mixer.directions.0.A_log: checkpoint \(48, 16\) vs model \(32, 16\)"):
        load_pretrained(tmp_path / "other")


def test_tiny_model_overfits_one_batch():
    torch.manual_seed(0)
    model = StarPretrain(**{**TINY, "depth": 2}).train()
    x = torch.randn(1, 2, 1, 16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(120):
        loss = model(x)["loss"]
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert min(losses[-5:]) < losses[0] / 10, losses[::10]


def test_predict_images_fills_predicted_clusters():
    model = tiny_pretrain(separator="none", num_images=1)
    x = images(k=1)
    out = model.predict_images(x)
    assert out["images"].shape == x.shape
    # the first cluster (rows 0-7, cols 0-7) is never predicted without a separator
    assert not out["predicted"][..., :8, :8].any() and out["predicted"][..., 8:, :].all()


def saved_bytes(run) -> int:
    """Bytes of the tensors autograd keeps for backward while `run()` builds its graph."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return sum(total)


@pytest.mark.parametrize("recompute", ["mixer", "block"])
def test_recompute_gives_the_same_gradients_and_keeps_less(recompute):
    """Recomputing in backward changes what is kept, not what is computed: the same loss and gradients (float64,
    the classifier's 4 directions with stochastic depth drawn again in the replay), less saved activation."""
    torch.manual_seed(0)
    images = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    labels = torch.tensor([0, 2])
    results = {}
    for mode in ("none", recompute):
        torch.manual_seed(1)
        model = VisionMambaClassifier(**TINY_CLF, num_classes=3, drop_path_rate=0.3, recompute=mode).double()
        model.train()

        def step():
            return F.cross_entropy(model(images), labels)

        torch.manual_seed(2)
        kept = saved_bytes(step)
        torch.manual_seed(2)
        loss = step()
        loss.backward()
        results[mode] = loss.detach(), {n: p.grad for n, p in model.named_parameters()}, kept
    (loss, grads, kept), (loss_r, grads_r, kept_r) = results["none"], results[recompute]
    assert torch.equal(loss, loss_r)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_r[name], grad, rtol=1e-12, atol=1e-12, msg=name)
    assert kept_r < 0.6 * kept, (kept_r, kept)
    with pytest.raises(ValueError, match="recompute must be one of"):
        VisionMambaClassifier(**TINY_CLF, recompute="all")
    # a run's memory choice, not the encoder's: a classifier does not inherit it from its pretraining model
    pretrained = tiny_pretrain(recompute=recompute)
    assert classifier_from_pretrain(pretrained)[0].init_args["recompute"] == "none"
    assert classifier_from_pretrain(pretrained, recompute=recompute)[0].init_args["recompute"] == recompute


def test_block_layer_norm_writes_the_autocast_dtype():
    """The blocks' LayerNorm keeps nn.LayerNorm's parameters and values; under autocast its output is already
    in the autocast dtype (what the next matmul would cast it to), and its gradients match nn.LayerNorm's."""
    from star.models.mamba import LayerNorm

    torch.manual_seed(0)
    norm, plain = LayerNorm(12), torch.nn.LayerNorm(12)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    plain.load_state_dict(norm.state_dict())
    x = torch.randn(5, 12) * 3 + 1
    torch.testing.assert_close(norm(x), plain(x), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = norm(x)
        expected = plain(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.to(torch.bfloat16), rtol=0, atol=0)
    grad = torch.randn(5, 12)
    out.float().backward(grad)
    expected.backward(grad)
    torch.testing.assert_close(norm.weight.grad, plain.weight.grad, rtol=1e-2, atol=1e-2)
