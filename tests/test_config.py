import pytest

from confeti_fast.config import dump_config, load_config, preset_names
from confeti_fast.errors import ConfetiError


def test_presets_exist_with_paper_settings():
    assert {"gta2cs", "synthia2cs", "demo"} <= set(preset_names())
    gta = load_config("gta2cs")
    assert gta["model"]["depth"] == 101
    assert gta["source"]["resize"] == [1280, 720] and gta["target"]["resize"] == [1280, 640]
    assert gta["stages"]["1"]["crop_size"] == [512, 512] and gta["stages"]["2"]["crop_size"] == [640, 640]
    assert gta["stages"]["1"]["iters"] == 80000
    assert gta["batch"] == {"source": 2, "target": 2}
    assert gta["pipeline"]["cat_max_ratio"] == 0.75
    assert gta["rcs"] == {"enabled": True, "temperature": 0.01, "min_pixels": 3000, "min_crop_ratio": 0.5}
    syn = load_config("synthia2cs")
    assert syn["source"]["type"] == "synthia" and syn["source"]["resize"] == [1280, 760]
    assert syn["eval_classes"] == "synthia16"


def test_resolved_config_round_trip(tmp_path):
    cfg = load_config("demo", {"seed": 7})
    path = dump_config(cfg, tmp_path / "run" / "config.py")
    assert "_base_" not in path.read_text()
    assert load_config(path) == cfg


def test_unknown_preset_names_the_option():
    with pytest.raises(ConfetiError, match="unknown preset 'gta2city'.*--config"):
        load_config("gta2city")


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfetiError, match="nope.py does not exist"):
        load_config(tmp_path / "nope.py")


@pytest.mark.parametrize("text, message", [
    ("{'name': 'x', 'seed': 0", "not a plain Python dict literal"),
    ("[1, 2]", "must hold one dict literal"),
    ("{'_base_': 'demo', 'batchsize': 4}", "unknown key"),
    ("{'_base_': 'demo', 'model': {'depth': 152}}", "model.depth"),
    ("{'_base_': 'demo', 'source': {'type': 'kitti'}}", "source.type"),
    ("{'_base_': 'demo', 'seed': 'zero'}", "'seed' must be an int"),
])
def test_wrong_config_is_one_line_error_naming_the_file(tmp_path, text, message):
    path = tmp_path / "bad.py"
    path.write_text(text)
    with pytest.raises(ConfetiError, match=message) as err:
        load_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
