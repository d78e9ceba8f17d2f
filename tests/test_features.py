"""Dense features: timm's forward_intermediates / features_only on the classifier and the pretraining encoder."""

import pytest
import timm
import torch

from star.models import StarPretrain, VisionMambaClassifier
from star.models.patches import resize_pos_embed

CLF = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=4, scan_impl="chunked", num_classes=3)
PRE = dict(img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=4, cluster_size=2, decoder_dim=32,
           decoder_num_heads=4, scan_impl="chunked")


def classifier(**kw):
    torch.manual_seed(0)
    return VisionMambaClassifier(**{**CLF, **kw}).eval()


def pretrain(**kw):
    torch.manual_seed(0)
    return StarPretrain(**{**PRE, **kw}).eval()


def images(h=16, w=16, b=2):
    return torch.randn(b, 1, h, w, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_classifier_intermediates_are_its_tokens_as_maps():
    model, x = classifier(), images()
    final, maps = model.forward_intermediates(x, indices=[1, -1])
    tokens = model.forward_features(x)
    m = model.cls_pos
    patches = torch.cat([tokens[:, :m], tokens[:, m + 1:]], dim=1)
    assert [t.shape for t in maps] == [(2, 32, 4, 4)] * 2
    torch.testing.assert_close(maps[1].flatten(2).transpose(1, 2), patches)  # raster order: row r, column c
    torch.testing.assert_close(final, tokens)
    nlc = model.forward_intermediates(x, indices=2, output_fmt="NLC", intermediates_only=True)
    assert len(nlc) == 2 and nlc[1].shape == (2, 16, 32)
    early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
    torch.testing.assert_close(early[0], maps[0])
    with_cls = model.forward_intermediates(x, indices=[3], return_prefix_tokens=True, intermediates_only=True)
    torch.testing.assert_close(with_cls[0][1], tokens[:, m:m + 1])


@torch.no_grad()
def test_classifier_features_at_another_size_match_a_model_built_for_it():
    """24x24 input to a 16 px model: the same as a 24 px model holding the interpolated embedding (cls moves
    to the middle of the 6x6 grid, the column scans follow it)."""
    model = classifier()
    big = VisionMambaClassifier(**{**CLF, "img_size": 24})
    big.load_state_dict({**model.state_dict(), "pos_embed": resize_pos_embed(model.pos_embed, 6)})
    x = images(24, 24)
    ours = model.forward_intermediates(x, indices=1, intermediates_only=True)[0]
    theirs = big.eval().forward_intermediates(x, indices=1, intermediates_only=True)[0]
    assert ours.shape == (2, 32, 6, 6)
    torch.testing.assert_close(ours, theirs)


@torch.no_grad()
def test_position_embedding_is_interpolated_once_per_size_and_weights():
    model = classifier()
    maps = model.forward_intermediates(images(24, 32), indices=1, intermediates_only=True)
    assert maps[0].shape == (2, 32, 6, 8)  # not square: H/4 x W/4
    first = model.grid_pos_embed((6, 8))
    torch.testing.assert_close(first, resize_pos_embed(model.pos_embed, (6, 8)))
    assert model.grid_pos_embed((6, 8)) is first  # cached
    assert model.grid_pos_embed((4, 4)) is model.pos_embed  # its own grid: no interpolation
    model.load_state_dict({**model.state_dict(), "pos_embed": torch.zeros_like(model.pos_embed)})
    assert torch.equal(model.grid_pos_embed((6, 8)), torch.zeros(1, 48, 32))  # new weights, new interpolation


@torch.no_grad()
@pytest.mark.parametrize("separator", ["cluster", "none"])
def test_pretraining_encoder_intermediates_are_its_sequence_in_raster_order(separator):
    model, x = pretrain(separator=separator), images()
    seq = model.build_sequence(x[:, None])
    tokens = model.forward_features(seq)  # outputs of its feature layers; the last is block 4
    s = model.separator_len
    expected = torch.empty_like(tokens[-1][:, s:]).index_copy_(1, model.order, tokens[-1][:, s:])
    final, maps = model.forward_intermediates(x, indices=[3], output_fmt="NLC", return_prefix_tokens=True)
    got, prefix = maps[0] if s else (maps[0], None)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(final, tokens[-1])
    if s:
        torch.testing.assert_close(prefix, tokens[-1][:, :s])
    assert model.forward_intermediates(images(24, 40), intermediates_only=True)[0].shape == (2, 32, 6, 10)


def test_bad_dense_feature_requests_fail_clearly():
    model, pre = classifier(), pretrain()
    with pytest.raises(ValueError, match="multiples of the patch size 4, got 18x16"):
        model.forward_intermediates(images(18, 16))
    with pytest.raises(ValueError, match="indices=\\[7\\] for a 4-block encoder"):
        model.forward_intermediates(images(), indices=[7])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(images(), output_fmt="NHWC")
    with pytest.raises(ValueError, match="can't be cut into 2x2 clusters"):
        pre.forward_intermediates(images(20, 20))  # a 5x5 grid
    with pytest.raises(ValueError, match="no final norm"):
        pre.forward_intermediates(images(), norm=True)


@torch.no_grad()
@pytest.mark.parametrize("name,args", [("star_tiny_patch16_224", CLF), ("star_pretrain_tiny_patch16_192", PRE)])
def test_timm_features_only(name, args):
    full = timm.create_model(name, **args).eval()
    net = timm.create_model(name, features_only=True, out_indices=(0, 2), **args).eval()
    assert net.feature_info.channels() == [32, 32] and net.feature_info.reduction() == [4, 4]
    assert len(net.model.blocks) == 3  # blocks after the last index pruned
    assert not any(k.startswith(("head.", "decoder", "feature_proj", "mask_token")) for k in net.state_dict())
    net.model.load_state_dict(full.state_dict(), strict=False)
    x = images(32, 24)
    out = net(x)
    assert [o.shape for o in out] == [(2, 32, 8, 6)] * 2
    expected = full.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b)
