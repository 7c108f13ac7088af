from pathlib import Path

import pytest
import yaml

from wsi_mil.config import Config, load_config
from wsi_mil.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_default_yaml_lists_every_key_with_the_model_defaults():
    documented = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert documented == Config().model_dump(mode="json")


def test_every_yaml_in_configs_validates():
    for path in (ROOT / "configs").glob("*.yaml"):
        load_config(path)


def test_overrides_are_typed():
    cfg = load_config(None, ["tiling.target_mpp=0.25", "slides.backend=tiffslide", "train.max_instances=64"])
    assert cfg.tiling.target_mpp == 0.25 and cfg.slides.backend == "tiffslide"
    assert cfg.train.max_instances == 64


@pytest.mark.parametrize("pairs, needle", [
    (["tiling.target_mp=0.5"], "unknown key 'tiling.target_mp'"),
    (["tiling.target_mpp=-1"], "tiling.target_mpp"),
    (["slides.backend=pillow"], "slides.backend"),
    (["tissue.median_ksize=4"], "tissue.median_ksize"),
    (["nonsense"], "not key=value"),
])
def test_bad_keys_and_values_name_the_key_in_one_line(pairs, needle):
    with pytest.raises(ConfigError) as err:
        load_config(None, pairs)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tiling:\n  patch_size: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
