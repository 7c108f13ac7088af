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
    paths = [*(ROOT / "configs").glob("*.yaml"), *(ROOT / "configs" / "mil").glob("*.yaml")]
    assert len(paths) >= 3
    for path in paths:
        load_config(path)


def test_the_ilse2018_recipe_is_the_papers():
    cfg = load_config(ROOT / "configs" / "mil" / "ilse2018.yaml")
    t, m = cfg.train, cfg.model
    assert (t.optimizer, t.lr, t.weight_decay, tuple(t.betas), t.batch_size) == ("adam", 5e-4, 5e-3, (0.9, 0.999), 1)
    assert (m.embed_dim, m.hidden_dim, m.attention_dim) == (256, 128, 64)


def test_overrides_are_typed():
    cfg = load_config(None, ["tiling.target_mpp=0.25", "slides.backend=tiffslide", "train.max_instances=64"])
    assert cfg.tiling.target_mpp == 0.25 and cfg.slides.backend == "tiffslide"
    assert cfg.train.max_instances == 64


@pytest.mark.parametrize("pairs, needle", [
    (["tiling.target_mp=0.5"], "unknown key 'tiling.target_mp'"),
    (["tiling.target_mpp=-1"], "tiling.target_mpp"),
    (["slides.backend=Pillow!"], "slides.backend"),
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


def test_wsi_mil_config_prints_the_effective_config_with_its_comments(tmp_path, capsys):
    from wsi_mil.cli import main

    user = tmp_path / "c.yaml"
    user.write_text("train:\n  folds: 3\n")
    assert main(["config", "--config", str(user), "tiling.target_mpp=0.25", "heatmap.exports=[png]"]) == 0
    text = capsys.readouterr().out
    expected = load_config(user, ["tiling.target_mpp=0.25", "heatmap.exports=[png]"]).model_dump(mode="json")
    assert yaml.safe_load(text) == expected and expected != Config().model_dump(mode="json")
    assert "target_mpp: 0.25" in text and "# µm/px of the patches" in text


def test_the_documented_defaults_ship_inside_the_package(tmp_path):
    import subprocess
    import sys
    import zipfile

    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("wsi_mil-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        shipped = yaml.safe_load(zf.read("wsi_mil/default.yaml"))
        names = set(zf.namelist())
    assert shipped == Config().model_dump(mode="json")
    # the viewer's pages and the OpenSeadragon build `make viewer-assets` copied from npm travel with it
    static = "wsi_mil/viewer/static/"
    assert {static + f for f in ("study.html", "slide.html", "study.js", "slide.js", "style.css")} <= names
    import shutil

    if shutil.which("npm") or (ROOT / static / "vendor" / "openseadragon" / "openseadragon.min.js").is_file():
        assert static + "vendor/openseadragon/openseadragon.min.js" in names
        assert any(n.startswith(static + "vendor/openseadragon/images/") for n in names)


def test_non_finite_values_are_refused():
    for pair in ("tiling.target_mpp=.inf", "tissue.mpp=.nan", "heatmap.alpha=-.inf"):
        with pytest.raises(ConfigError, match=pair.split("=")[0]):
            load_config(None, [pair])
