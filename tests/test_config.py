"""Config loading, overrides, error messages and round-trips."""

import pytest

from star.config import (TASKS, TrainConfig, apply_overrides, check_config, config_from_dict, list_presets,
                         load_config, save_config)


def test_presets_load_for_every_recipe_they_hold():
    assert {"fmnist-tiny", "imagenet-base", "imagenet-large"} <= set(list_presets())
    for task in TASKS:
        cfg = load_config("fmnist-tiny", task)
        assert cfg.task == task and cfg.data.dataset == "fashion-mnist" and cfg.model.img_size == 32
    pre, fine = load_config("imagenet-base", "pretrain"), load_config("imagenet-base", "finetune")
    # the paper's recipes (STAR_SPEC sections 3 and 4)
    assert (pre.optim.blr, pre.optim.betas, pre.optim.clip_grad, pre.model.num_images) == (1.5e-4, (0.9, 0.95), 3.0, 4)
    assert (fine.optim.layer_decay, fine.model.drop_path_rate, fine.optim.ema_decay) == (0.65, 0.1, 0.99992)
    assert load_config("imagenet-large", "finetune").optim.layer_decay == 0.75
    with pytest.raises(ValueError, match="no 'linprobe' recipe"):
        load_config("imagenet-base", "linprobe")
    with pytest.raises(ValueError, match="presets: .*fmnist-tiny"):
        load_config("no-such-preset")


def test_overrides_parse_by_field_type():
    cfg = apply_overrides(load_config("fmnist-tiny", "pretrain"), [
        "--optim.blr", "1e-4", "--model.num_images", "8", "--data.hflip", "false", "--optim.betas", "0.8,0.9",
        "--optim.clip_grad=none", "--model.separator=token", "--compile", "--max_steps", "5"])
    assert cfg.optim.blr == 1e-4 and isinstance(cfg.optim.blr, float)
    assert cfg.model.num_images == 8 and cfg.data.hflip is False and cfg.optim.betas == (0.8, 0.9)
    assert cfg.optim.clip_grad is None and cfg.model.separator == "token" and cfg.compile is True and cfg.max_steps == 5


@pytest.mark.parametrize("args, words", [
    (["--optim.blrr", "1"], ["optim.blrr", "optim.blr"]),  # unknown name: suggests the close match
    (["--optim.blr", "fast"], ["optim.blr", "float"]),
    (["--model.num_images", "2.5"], ["model.num_images", "int"]),
    (["--model.separator", "dots"], ["model.separator", "cluster|token|fixed|none"]),
    (["--optim.betas", "0.9"], ["optim.betas", "float,float"]),
    (["--data.hflip", "maybe"], ["data.hflip", "bool"]),
    (["--optim", "3"], ["optim", "section", "optim.blr"]),
    (["--seed.x", "3"], ["seed", "not a section"]),
    (["--epochs", "3"], ["epochs", "optim.epochs"]),
    (["--optim.blr"], ["optim.blr", "needs a value"]),
])
def test_bad_overrides_name_the_field(args, words):
    with pytest.raises(ValueError) as err:
        apply_overrides(TrainConfig(), args)
    for word in words:
        assert word in str(err.value)


def test_yaml_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("optim:\n  warmup_epoch: 3\n")
    with pytest.raises(ValueError, match=r"optim\.warmup_epoch.*optim\.warmup_epochs"):
        load_config(str(path))
    path.write_text("task: distill\n")
    with pytest.raises(ValueError, match="task.*pretrain|finetune|linprobe"):
        load_config(str(path))


def test_save_load_round_trip(tmp_path):
    cfg = apply_overrides(load_config("imagenet-base", "finetune"), ["--optim.lr", "3e-3", "--resume", "auto"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == cfg
    # YAML 1.1 reads "1e-4" as a string; the field type still makes it a float
    path = tmp_path / "plain.yaml"
    path.write_text("optim:\n  blr: 1e-4\n  betas: [0.9, 0.95]\n")
    assert load_config(str(path)).optim.blr == 1e-4
    assert config_from_dict({}) == TrainConfig()


def test_separator_none_is_a_choice_not_unset():
    # "none" is one of model.separator's choices (ARM); "null" leaves the registry default
    cfg = apply_overrides(TrainConfig(), ["--model.separator", "none"])
    assert cfg.model.separator == "none" and cfg.model.overrides()["separator"] == "none"
    assert config_from_dict({"model": {"separator": "none"}}).model.separator == "none"
    assert apply_overrides(cfg, ["--model.separator", "null"]).model.separator is None
    assert apply_overrides(TrainConfig(), ["--resume", "none"]).resume is None


@pytest.mark.parametrize("args, words", [
    (["--data.label_fraction", "1.5"], ["data.label_fraction", "(0, 1]"]),
    (["--data.val_size", "-5"], ["data.val_size", ">= 0"]),
    (["--data.num_samples", "0"], ["data.num_samples", ">= 1"]),
    (["--data.scale_min", "-1"], ["data.scale_min", "(0, 1]"]),
    (["--optim.smoothing", "1.5"], ["optim.smoothing", "[0, 1)"]),
    (["--optim.ema_decay", "2"], ["optim.ema_decay", "[0, 1)"]),
    (["--optim.warmup_epochs", "-1"], ["optim.warmup_epochs", ">= 0"]),
    (["--optim.clip_grad", "-1"], ["optim.clip_grad", "> 0"]),
    (["--optim.betas", "0.9,1.5"], ["optim.betas", "[0, 1)"]),
    (["--model.num_classes", "0"], ["model.num_classes", ">= 1"]),
    (["--log_every", "0"], ["log_every", ">= 1"]),
    (["--model.patch_size", "0"], ["model.patch_size", ">= 1"]),
    (["--model.embed_dim", "0"], ["model.embed_dim", ">= 1"]),
    (["--model.img_size", "0"], ["model.img_size", ">= 1"]),
    (["--data.img_size", "-3"], ["data.img_size", ">= 1"]),
    (["--optim.warmup_epochs", "nan"], ["optim.warmup_epochs", ">= 0, got nan"]),
    (["--optim.lr", "1e39"], ["optim.lr", "(0, 1000]", "1e+39"]),
    (["--optim.lr", "inf"], ["optim.lr", "(0, 1000]", "inf"]),
    (["--optim.blr", "nan"], ["optim.blr", "(0, 1000]", "nan"]),
    (["--data.mixup", "0.8", "--optim.batch_size", "15"], ["batch_size must be even", "15"]),
])
def test_values_out_of_range_name_the_flag(args, words):
    cfg = apply_overrides(load_config("fmnist-tiny", "finetune"), args)
    with pytest.raises(ValueError) as err:
        check_config(cfg)
    for word in words:
        assert word in str(err.value)


def test_checks_pass_the_presets_and_catch_pretrained_pretraining():
    for name in ("fmnist-tiny", "fmnist-demo", "imagenet-base", "imagenet-large"):
        for task in ("pretrain", "finetune", "linprobe"):
            try:
                cfg = load_config(name, task)
            except ValueError:  # a preset without this task's recipe
                continue
            check_config(cfg)
    cfg = apply_overrides(load_config("fmnist-tiny", "pretrain"), ["--pretrained", "runs/x"])
    with pytest.raises(ValueError, match="--resume"):
        check_config(cfg)


def test_yaml_syntax_error_names_the_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model:\n  embed_dim: [32\n")
    with pytest.raises(ValueError, match="broken.yaml is not valid YAML"):
        load_config(str(path))


def test_config_choices_are_the_code_s_choices():
    """Config fields that take a choice list exactly what the code accepts (one list, read from the code)."""
    import typing

    from star.config import ModelConfig
    from star.models.classifier import GLOBAL_POOLS
    from star.models.mamba import RECOMPUTE
    from star.models.star import DECODER_WINDOWS, SEPARATORS
    from star.ops.impls import IMPLS

    hints = typing.get_type_hints(ModelConfig)
    for field, choices in (("separator", tuple(SEPARATORS)), ("decoder_window", DECODER_WINDOWS),
                           ("scan_impl", IMPLS), ("global_pool", GLOBAL_POOLS), ("recompute", RECOMPUTE)):
        literal, _none = typing.get_args(hints[field])
        assert typing.get_args(literal) == choices, field


def test_model_config_fields_are_model_arguments():
    """Every model.* field is an argument of a model class, so an override can only mean what the code takes."""
    import dataclasses
    import inspect

    from star.config import ModelConfig
    from star.models import StarPretrain, VisionMambaClassifier

    arguments = set(inspect.signature(StarPretrain).parameters) | set(inspect.signature(VisionMambaClassifier).parameters)
    fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"name"}
    assert fields <= arguments, sorted(fields - arguments)
