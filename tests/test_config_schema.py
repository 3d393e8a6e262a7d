"""Every config key is checked at any depth against the merged preset chain, and
`--cfg-options key.path=value` items go through the same check."""
import pytest

from confeti_fast.config import dump_config, load_config, parse_cfg_options, preset_names
from confeti_fast.errors import ConfetiError


def _error(path_or_preset, overrides=None, **kwargs):
    with pytest.raises(ConfetiError) as err:
        load_config(path_or_preset, overrides, **kwargs)
    message = str(err.value)
    assert "\n" not in message
    return message


def test_the_issue_typo_names_the_full_path_the_nearest_key_and_the_file(tmp_path):
    path = tmp_path / "typo.py"
    path.write_text('{"_base_": "demo", "name": "typo", "train": {"contrast_afer": 10}, '
                    '"optimizer": {"lrr": 1.0}}')
    message = _error(path)
    assert message.startswith(f"{path}: unknown key 'train.contrast_afer'")
    assert "did you mean 'train.contrast_after'?" in message
    assert "optimizer.lrr" in message  # the second typo is listed too


@pytest.mark.parametrize("overrides, path, nearest", [
    ({"optimizer": {"lrr": 1.0}}, "optimizer.lrr", "optimizer.lr"),
    ({"train": {"contrast": {"tua": 0.2}}}, "train.contrast.tua", "train.contrast.tau"),
    ({"train": {"color_jitter": {"strenght": 0.2}}}, "train.color_jitter.strenght", "train.color_jitter.strength"),
    ({"stages": {"2": {"iter": 5}}}, "stages.2.iter", "stages.2.iters"),
    ({"evaluation": {"slide_strid": [8, 8]}}, "evaluation.slide_strid", "evaluation.slide_stride"),
    ({"runtime": {"compil": None}}, "runtime.compil", "runtime.compile"),
    ({"runtim": {}}, "runtim", "runtime"),
])
def test_unknown_key_at_any_depth(overrides, path, nearest):
    message = _error("demo", overrides)
    assert f"unknown key '{path}'" in message and f"did you mean '{nearest}'?" in message


def test_unknown_key_without_a_near_one_lists_the_valid_keys():
    message = _error("demo", {"stages": {"7": {"iters": 1}}})
    assert "unknown key 'stages.7'" in message and "0, 1, 2" in message


@pytest.mark.parametrize("overrides, path", [
    ({"train": {"contrast_after": "ten"}}, "'train.contrast_after' must be an int"),
    ({"optimizer": {"lr": "fast"}}, "'optimizer.lr' must be a number"),
    ({"train": {"blur": 1}}, "'train.blur' must be True or False"),
    ({"seed": True}, "'seed' must be an int"),
    ({"stages": {"1": {"iters": 2.5}}}, "'stages.1.iters' must be an int"),
    ({"train": {"contrast": 0.1}}, "'train.contrast' must be a dict"),
    ({"model": {"depth": None}}, "'model.depth' must be an int"),
    ({"evaluation": {"scale": "full"}}, "'evaluation.scale' must be a list or None"),
    ({"name": ["a"]}, "'name' must be a string"),
])
def test_wrong_type_names_the_key(overrides, path):
    assert path in _error("demo", overrides)


@pytest.mark.parametrize("overrides", [
    {"optimizer": {"lr": 1}},  # an int where a float is expected
    {"evaluation": {"scale": None}},  # documented optional
    {"evaluation": {"scale": (640, 320)}},  # tuple for a list
    {"model": {"pretrained": "weights/r18.pth"}},  # demo's default is None: gta2cs's str fits
    {"source": {"generate": None}},
    {"train": {"color_jitter": {"prob": 1}}},
    {"runtime": {"amp": "auto"}},
])
def test_values_that_fit(overrides):
    load_config("demo", overrides)


def test_gta2cs_accepts_an_optional_none():
    assert load_config("gta2cs", {"model": {"pretrained": None}})["model"]["pretrained"] is None


def test_every_preset_and_its_resolved_config_validate(tmp_path):
    for name in preset_names():
        cfg = load_config(name)
        # a resolved config.py has no _base_: the root preset's schema applies to it
        assert load_config(dump_config(cfg, tmp_path / f"{name}.py")) == cfg


def test_an_intermediate_file_with_a_typo_is_named(tmp_path):
    middle = tmp_path / "middle.py"
    middle.write_text("{'_base_': 'demo', 'cut': {'ngff': 8}}")
    top = tmp_path / "top.py"
    top.write_text(f"{{'_base_': {str(middle)!r}, 'name': 'top'}}")
    message = _error(top)
    assert message.startswith(f"{middle}: unknown key 'cut.ngff'") and "'cut.ngf'" in message


def test_cfg_options_parse_literals_and_paths():
    assert parse_cfg_options([
        "train.contrast_after=10", "optimizer.lr=6e-5", "evaluation.scale=[1024, 512]", "model.pretrained=None",
        "source.root=data/my gta5", "train.blur=False", "stages.2.iters=5", "name='quoted'",
    ]) == {
        "train": {"contrast_after": 10, "blur": False}, "optimizer": {"lr": 6e-5},
        "evaluation": {"scale": [1024, 512]}, "model": {"pretrained": None},
        "source": {"root": "data/my gta5"}, "stages": {"2": {"iters": 5}}, "name": "quoted",
    }


@pytest.mark.parametrize("item", ["train.contrast_after", "=3", "train..blur=1", "train.=1"])
def test_cfg_options_need_key_path_equals_value(item):
    with pytest.raises(ConfetiError, match="--cfg-options takes key.path=value"):
        parse_cfg_options([item])


def test_cfg_options_are_checked_like_a_file():
    options = parse_cfg_options(["train.contrast_afer=10"])
    message = _error("demo", options, overrides_origin="--cfg-options")
    assert message.startswith("--cfg-options: unknown key 'train.contrast_afer'")
    assert "'train.contrast_after'" in message


@pytest.mark.parametrize("cut, named", [
    ({"generator": "unet"}, "cut.generator must be one of ('resnet', 'residual'), got 'unet'"),
    ({"d_layers": 4}, "cut.d_layers must be 1, 2 or 3"),
    ({"d_ignore_bottom": -2}, "cut.d_ignore_bottom must be >= 0"),
    ({"stage0_source_crops": "uniform"}, "cut.stage0_source_crops must be 'rcs' or 'plain', got 'uniform'"),
    ({"identity_l1_weight": -0.5}, "cut.identity_l1_weight must be >= 0"),
])
def test_the_style_transfer_choices_are_checked(cut, named):
    assert named in _error("demo", {"cut": cut})
