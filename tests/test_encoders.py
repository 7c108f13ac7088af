"""Issue 18: every encoder preset runs exactly as its authors run it.

For each registered preset the official recipe is restated here from the model card, independently of
wsi_mil (timm / torchvision / transformers called directly, the card's transform in torchvision). Its
random weights are saved in the official file layout and loaded through ``encoder.weights``; then:
- the key sets and shapes agree with the official model's;
- on the same preprocessed tensor our feature equals the official pooled output (fp32, 1e-5);
- on tiles read from a slide, our whole extraction and the official transform of the same region give
  features with cosine >= 0.999 (the geometry, the resize and the normalisation).
In ``make test`` each architecture runs at its real width with 2 blocks (the family: embeddings, registers,
SwiGLU, LayerScale, pooling, key layout); WSI_MIL_SLOW=1 runs the full depth (giant models: minutes).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import timm
import torch
from conftest import CMU
from torch import nn
from torchvision import transforms as T

from wsi_mil.cli import main
from wsi_mil.config import EncoderConfig
from wsi_mil.errors import WsiMilError
from wsi_mil.features.encoders import PRESETS, build_encoder
from wsi_mil.formats import read_patch_file, read_tissue_mask, write_patch_file
from wsi_mil.layout import Layout
from wsi_mil.synthetic import SyntheticSpec, write_slide

FULL = os.environ.get("WSI_MIL_SLOW") == "1"
IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
BILINEAR, BICUBIC = T.InterpolationMode.BILINEAR, T.InterpolationMode.BICUBIC


def _tf(resize, crop, interp, mean=IMAGENET[0], std=IMAGENET[1]):
    steps = [T.Resize(resize, interpolation=interp)] + ([T.CenterCrop(crop)] if crop else [])
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def _swiglu():
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU}


class _CardResNet(nn.Module):
    """CLAM's truncated ResNet-50 from torchvision: conv1..layer3, global average pool."""

    def __init__(self):
        super().__init__()
        import torchvision

        r = torchvision.models.resnet50()
        self.full = r
        self.trunk = nn.Sequential(r.conv1, r.bn1, r.relu, r.maxpool, r.layer1, r.layer2, r.layer3)

    def forward(self, x):
        return self.trunk(x).mean((2, 3))


def _vit(arch, depth, full_depth=None, **kw):
    """The card's timm model: ``depth`` blocks in make test; at full depth the card's own depth, or the
    architecture's when the card gives none."""
    full = {"depth": full_depth} if full_depth else {}
    return timm.create_model(arch, num_classes=0, **(full if FULL else {"depth": depth}), **kw)


def _cls_mean(model, prefix):
    def pooled(x):
        tokens = model(x)  # global_pool="" gives every token
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], -1)
    return pooled


# name -> (official model factory, its pooled forward, the card's transform, file layout, overrides for ours)
def card(name: str):
    """The official model, its pooled forward, the card's transform, its file (format, state) and the depth
    override for ours. LayerScale factors are drawn around 1 (they start at 1e-5), so every block counts."""
    official, pooled, tf, (fmt, state), over = _card(name)
    with torch.no_grad():
        for key, param in official.named_parameters():
            if key.endswith(("gamma", "lambda1")):
                param.normal_(1.0, 0.1)
    state = official.state_dict() if fmt != "transformers" else _as_published(official.state_dict())
    if name == "resnet50_trunc":
        state = official.full.state_dict()
    return official, pooled, tf, (fmt, state), over


def _card(name: str):
    d = 2
    if name == "resnet50_trunc":
        m = _CardResNet()
        return m, m, _tf(224, None, BILINEAR), ("torchvision", m.full.state_dict()), {}
    if name in ("uni",):
        m = _vit("vit_large_patch16_224", d, img_size=224, patch_size=16, init_values=1e-5, dynamic_img_size=True)
        return m, m, _tf(224, 224, BILINEAR), ("timm", m.state_dict()), {"depth": d}
    if name == "uni2_h":
        m = _vit("vit_giant_patch14_224", d, 24, img_size=224, patch_size=14, num_heads=24, init_values=1e-5,
                 embed_dim=1536, mlp_ratio=2.66667 * 2, no_embed_class=True, reg_tokens=8, dynamic_img_size=True,
                 **_swiglu())
        return m, m, _tf(224, 224, BILINEAR), ("timm", m.state_dict()), {"depth": d}
    if name in ("h_optimus_0", "h_optimus_1"):
        m = _vit("vit_giant_patch14_reg4_dinov2", d, img_size=224, global_pool="token", init_values=1e-5,
                 dynamic_img_size=False)
        hmean, hstd = (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517)
        return m, m, _tf(224, None, BILINEAR, hmean, hstd), ("timm", m.state_dict()), {"depth": d}
    if name in ("virchow", "virchow2"):
        regs = {"reg_tokens": 4} if name == "virchow2" else {}
        m = _vit("vit_huge_patch14_224", d, img_size=224, init_values=1e-5, mlp_ratio=5.3375, global_pool="",
                 dynamic_img_size=True, **regs, **_swiglu())
        return m, _cls_mean(m, 5 if regs else 1), _tf(224, None, BICUBIC), ("timm", m.state_dict()), {"depth": d}
    if name == "gigapath":
        m = _vit("vit_giant_patch14_dinov2", d, img_size=224, patch_size=16, embed_dim=1536, num_heads=24,
                 init_values=1e-5, mlp_ratio=5.33334)
        return m, m, _tf(256, 224, BICUBIC), ("timm", m.state_dict()), {"depth": d}
    if name == "phikon_v2":
        from transformers import Dinov2Config, Dinov2Model

        cfg = Dinov2Config(hidden_size=1024, num_hidden_layers=24 if FULL else d, num_attention_heads=16, mlp_ratio=4,
                           image_size=224, patch_size=16, layerscale_value=1e-5)
        m = Dinov2Model(cfg)
        return m, (lambda x: m(pixel_values=x).last_hidden_state[:, 0]), _tf(224, 224, BILINEAR), \
            ("transformers", _as_published(m.state_dict())), {"depth": d}
    if name == "gpfm":
        m = _vit("vit_large_patch14_dinov2", d, img_size=224, init_values=1e-5, dynamic_img_size=True)
        return m, m, _tf((224, 224), None, BICUBIC), ("timm", m.state_dict()), {"depth": d}
    if name.startswith("kaiko_"):
        arch, img = {"kaiko_vits16": ("vit_small_patch16_224", 224), "kaiko_vits8": ("vit_small_patch8_224", 224),
                     "kaiko_vitb16": ("vit_base_patch16_224", 224), "kaiko_vitb8": ("vit_base_patch8_224", 224),
                     "kaiko_vitl14": ("vit_large_patch14_reg4_dinov2", 518)}[name]
        m = _vit(arch, d, img_size=img, dynamic_img_size=True)
        half = (0.5, 0.5, 0.5)
        return m, m, _tf((224, 224), 224, BILINEAR, half, half), ("timm", m.state_dict()), {"depth": d}
    if name in ("h0_mini", "lunit_vits8", "gigapath_flash", "virchow2_cls"):
        return _card_timm_2025(name, d)
    if name in ("hibou_b", "hibou_l", "midnight12k"):
        return _card_dinov2(name, d)
    if name == "conch_v15":
        m = _CardConchV15(_vit("vit_large_patch16_224", d, img_size=224, init_values=1.0))
        return m, m, _tf(448, 448, BILINEAR), ("conch", m.state_dict()), {"depth": d}
    if name == "phikon":
        from transformers import ViTConfig, ViTModel

        cfg = ViTConfig(hidden_size=768, num_hidden_layers=12 if FULL else d, num_attention_heads=12,
                        intermediate_size=3072, image_size=224, patch_size=16, qkv_bias=True, layer_norm_eps=1e-12)
        m = ViTModel(cfg, add_pooling_layer=True)
        return m, (lambda x: m(pixel_values=x).last_hidden_state[:, 0]), _tf(224, None, BILINEAR), \
            ("transformers", _as_published(m.state_dict())), {"depth": d}
    raise KeyError(name)


HOPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))


def _card_timm_2025(name: str, d: int):
    """H0-mini (card: timm hub model with SwiGLUPacked/SiLU, timm's data config; Bioptimus' SDK: cls +
    patch mean), Lunit ViT-S/8 (their README: ToTensor + Normalize on 224-px tiles), Prov-GigaPath-Flash
    (ViT-S/16, SwiGLU fc1 2048, LayerScale; GigaPath's transform), Virchow2's class token alone."""
    if name == "h0_mini":
        m = _vit("vit_base_patch14_reg4_dinov2", d, img_size=224, mlp_ratio=2.66667 * 2, global_pool="",
                 dynamic_img_size=True, **_swiglu())
        tf = timm.data.create_transform(input_size=(3, 224, 224), interpolation="bicubic", crop_pct=1.0,
                                        crop_mode="center", mean=HOPTIMUS[0], std=HOPTIMUS[1], is_training=False)
        return m, _cls_mean(m, m.num_prefix_tokens), tf, ("timm", m.state_dict()), {"depth": d}
    if name == "lunit_vits8":
        m = _vit("vit_small_patch8_224", d, img_size=224, dynamic_img_size=True)
        tf = T.Compose([T.ToTensor(), T.Normalize((0.70322989, 0.53606487, 0.66096631),
                                                  (0.21716536, 0.26081574, 0.20723464))])
        return m, m, tf, ("timm", m.state_dict()), {"depth": d}
    if name == "gigapath_flash":
        from timm.models.vision_transformer import VisionTransformer

        m = VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12 if FULL else d, num_heads=6,
                              mlp_ratio=2048 / 384.0, init_values=1e-5, num_classes=0, global_pool="token",
                              dynamic_img_size=True, **_swiglu())
        return m, m, _tf(256, 224, BICUBIC), ("timm", m.state_dict()), {"depth": d}
    m = _vit("vit_huge_patch14_224", d, img_size=224, init_values=1e-5, mlp_ratio=5.3375, reg_tokens=4,
             global_pool="", dynamic_img_size=True, **_swiglu())
    return m, (lambda x: m(x)[:, 0]), _tf(224, None, BICUBIC), ("timm", m.state_dict()), {"depth": d}


def _card_dinov2(name: str, d: int):
    """Hibou-B/L (transformers DINOv2 with 4 registers, the architecture of their remote code;
    ``pooler_output``; their image processor) and Midnight-12k (transformers Dinov2Model ViT-g/14 SwiGLU;
    its card's classification embedding: class token ++ mean of patch tokens; mean/std 0.5)."""
    from transformers import Dinov2Config, Dinov2Model, Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    if name == "midnight12k":
        m = Dinov2Model(Dinov2Config(hidden_size=1536, num_hidden_layers=40 if FULL else d, num_attention_heads=24,
                                     mlp_ratio=4, use_swiglu_ffn=True, image_size=224, patch_size=14,
                                     layerscale_value=1e-5))

        def pooled(x):
            tokens = m(pixel_values=x).last_hidden_state
            return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], -1)
        half = (0.5, 0.5, 0.5)
        return m, pooled, _tf(224, 224, BILINEAR, half, half), ("transformers", m.state_dict()), {"depth": d}
    width, layers, heads = {"hibou_b": (768, 12, 12), "hibou_l": (1024, 24, 16)}[name]
    m = Dinov2WithRegistersModel(Dinov2WithRegistersConfig(
        hidden_size=width, num_hidden_layers=layers if FULL else d, num_attention_heads=heads, mlp_ratio=4,
        image_size=224, patch_size=14, num_register_tokens=4, layerscale_value=1.0))
    tf = _tf(224, 224, BICUBIC, (0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
    return m, (lambda x: m(pixel_values=x).pooler_output), tf, ("transformers", m.state_dict()), {"depth": d}


class _CardConchV15(nn.Module):
    """CONCH v1.5's vision tower as its published recipe builds it: the ViT-L/16 trunk on a 224 grid, its
    position embedding interpolated DINO-style at 448 (bicubic, scale factor (28 + 0.1) / 14), the
    contrastive attentional pooler (1 query, 8 heads, written out with einsum here) and ln_contrast."""

    def __init__(self, trunk):
        super().__init__()
        self.trunk = trunk
        self.attn_pool_contrast = nn.Module()
        pool = self.attn_pool_contrast
        pool.query = nn.Parameter(torch.randn(1, 768))
        pool.ln_k, pool.ln_q = nn.LayerNorm(1024), nn.LayerNorm(768)
        pool.to_q, pool.to_kv = nn.Linear(768, 768, bias=False), nn.Linear(1024, 1536, bias=False)
        pool.to_out = nn.Linear(768, 768, bias=False)
        self.ln_contrast = nn.LayerNorm(768)

    def forward(self, x):
        import math

        t, pool = self.trunk, self.attn_pool_contrast
        b, _, h, w = x.shape
        tokens = t.patch_embed.proj(x).flatten(2).transpose(1, 2)
        tokens = torch.cat([t.cls_token.expand(b, -1, -1), tokens], 1)
        n = t.pos_embed.shape[1] - 1
        grid = nn.functional.interpolate(
            t.pos_embed[:, 1:].reshape(1, int(math.sqrt(n)), int(math.sqrt(n)), -1).permute(0, 3, 1, 2),
            scale_factor=((h // 16 + 0.1) / math.sqrt(n), (w // 16 + 0.1) / math.sqrt(n)), mode="bicubic")
        pos = torch.cat([t.pos_embed[:, :1], grid.permute(0, 2, 3, 1).reshape(1, -1, grid.shape[1])], 1)
        tokens = t.norm(t.blocks(tokens + pos))
        q = pool.to_q(pool.ln_q(pool.query)).reshape(1, 8, 96).transpose(0, 1)  # heads, 1, 96
        k, v = pool.to_kv(pool.ln_k(tokens)).chunk(2, -1)
        k, v = (z.reshape(b, -1, 8, 96).permute(0, 2, 1, 3) for z in (k, v))  # b, heads, n, 96
        attn = torch.einsum("hqd,bhnd->bhqn", q * 96 ** -0.5, k).softmax(-1)
        out = torch.einsum("bhqn,bhnd->bqhd", attn, v).reshape(b, 1, 768)
        return self.ln_contrast(pool.to_out(out)[:, 0])


def _as_published(state: dict) -> dict:
    """The names of the published files (transformers 4's ViTModel / Dinov2Model: owkin/phikon,
    owkin/phikon-v2); transformers 5 renamed them."""
    import re

    rules = [(r"^(?:layers|encoder\.layer)\.(\d+)\.attention\.([qkv])_proj\.",
              lambda m: f"encoder.layer.{m[1]}.attention.attention.{dict(q='query', k='key', v='value')[m[2]]}."),
             (r"^(?:layers|encoder\.layer)\.(\d+)\.attention\.o_proj\.",
              lambda m: f"encoder.layer.{m[1]}.attention.output.dense."),
             (r"^layers\.(\d+)\.mlp\.fc1\.", lambda m: f"encoder.layer.{m[1]}.intermediate.dense."),
             (r"^layers\.(\d+)\.mlp\.fc2\.", lambda m: f"encoder.layer.{m[1]}.output.dense."),
             (r"^(encoder\.layer\.\d+)\.mlp\.down_proj\.", lambda m: f"{m[1]}.mlp.weights_out."),
             (r"^layers\.(\d+)\.", lambda m: f"encoder.layer.{m[1]}.")]
    out, gate_up = {}, {}
    for key, value in state.items():
        for pattern, repl in rules:
            if re.match(pattern, key):
                key = re.sub(pattern, repl, key)
                break
        m = re.match(r"^(encoder\.layer\.\d+\.mlp)\.(gate_proj|up_proj)\.(weight|bias)$", key)
        if m:  # transformers 4 (the published files) packs SwiGLU's gate and up: weights_in = [gate; up]
            gate_up.setdefault((m[1], m[3]), {})[m[2]] = value
            continue
        out[key] = value
    for (prefix, leaf), pair in gate_up.items():
        out[f"{prefix}.weights_in.{leaf}"] = torch.cat([pair["gate_proj"], pair["up_proj"]], 0)
    return out


def _ours(monkeypatch, name: str, overrides: dict, weights: Path):
    if overrides and not FULL:
        monkeypatch.setitem(PRESETS, name, dataclasses.replace(PRESETS[name], kwargs={**PRESETS[name].kwargs,
                                                                                       **overrides}))
    return build_encoder(EncoderConfig(name=name, weights=weights))


def _save(state: dict, folder: Path, fmt: str) -> Path:
    path = folder / ("pytorch_model.bin" if fmt in ("timm", "transformers") else "resnet50.pth")
    torch.save({k: v.contiguous() for k, v in state.items()}, path)
    return path


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    if CMU.is_file():
        return CMU
    path = tmp_path_factory.mktemp("enc") / "enc.svs"
    write_slide(path, SyntheticSpec(width=1400, height=1200, mpp=0.5, seed=12, tumour=True))
    return path


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_is_its_official_recipe(name, tmp_path, monkeypatch, slide):
    torch.manual_seed(0)
    official, pooled, card_tf, (fmt, state), overrides = card(name)
    official.eval()
    weights = _save(state, tmp_path, fmt)
    enc = _ours(monkeypatch, name, overrides, weights)
    # 1. the official file loads key for key, shape for shape, into our model's trunk
    ours_state = {k: v for k, v in enc.model.state_dict().items()}
    theirs = state if fmt != "transformers" else _converted(state)
    trunk = {k.removeprefix("vit."): v for k, v in ours_state.items()}
    expected = {k: v for k, v in theirs.items() if not k.startswith(("fc.", "layer4.", "pooler."))}
    assert set(trunk) == set(expected), sorted(set(trunk) ^ set(expected))[:6]
    assert all(tuple(trunk[k].shape) == tuple(expected[k].shape) for k in trunk)
    # 2. the same preprocessed tensor gives the official pooled output
    x = torch.randn(2, 3, enc.input_size, enc.input_size)
    with torch.inference_mode():
        ref, got = pooled(x), enc.model(x)
    assert got.shape == ref.shape == (2, enc.dim)
    assert float((got - ref).abs().max()) < 1e-5
    # 3. our whole extraction vs the card's transform on the same regions of a slide
    _whole_extraction_agrees(name, enc, official, pooled, card_tf, weights, slide, tmp_path)


def _converted(state: dict) -> dict:
    from wsi_mil.features.encoders.weights import from_transformers_vit

    return from_transformers_vit(state)


def _whole_extraction_agrees(name, enc, official, pooled, card_tf, weights, slide, tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / slide.name).symlink_to(slide)
    out = tmp_path / "out"
    common = ["--slides", str(slides), "--out", str(out), "--no-progress", f"encoder.name={name}",
              f"encoder.weights={weights}", "extract.num_workers=0", "extract.batch_size=8"]
    assert main(["tile", *common]) == 0
    coords, spec = read_patch_file(Layout(out).patches(slide.stem))
    preset = PRESETS[name]
    assert (spec.patch_size_target, spec.target_mpp) == (preset.tile_px, preset.mpp)  # tiled natively
    keep = coords[:6]  # a few patches are enough: the patch file is rewritten with them alone
    path = Layout(out).patches(slide.stem)
    write_patch_file(path, slide.stem, keep, np.zeros_like(keep), np.ones(len(keep)), spec, read_tissue_mask(path))
    assert main(["extract", *common]) == 0
    with h5py.File(Layout(out).features(enc.encoder_id, slide.stem)) as fh:
        ours = fh["features"][:]
    import openslide

    with openslide.OpenSlide(str(slide)) as s, torch.inference_mode():
        imgs = [s.read_region(tuple(int(v) for v in c), spec.patch_level, (spec.patch_size_level,) * 2).convert("RGB")
                for c in keep]
        ref = pooled(torch.stack([card_tf(im) for im in imgs])).numpy()
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.999, (name, cos)


def test_virchow2_loads_its_published_layout_and_a_misfit_names_the_key_and_both_shapes(tmp_path, monkeypatch):
    """Virchow2's card has no no_embed_class: its pos_embed is (1, 261, 1280). The old preset built
    (1, 256, 1280), and the hub path blamed the network."""
    official = timm.create_model("vit_huge_patch14_224", num_classes=0, img_size=224, init_values=1e-5,
                                 mlp_ratio=5.3375, reg_tokens=4, global_pool="", dynamic_img_size=True, depth=1,
                                 **_swiglu())
    assert tuple(official.pos_embed.shape) == (1, 261, 1280)
    uni = timm.create_model("vit_large_patch16_224", num_classes=0, init_values=1e-5, depth=1)
    bad = tmp_path / "uni.bin"
    torch.save(uni.state_dict(), bad)
    with pytest.raises(WsiMilError) as err:
        build_encoder(EncoderConfig(name="resnet50_trunc", weights=bad))
    assert "does not fit encoder 'resnet50_trunc'" in str(err.value) and "\n" not in str(err.value)
    # a file of the right keys and the wrong shapes: one line naming the key and both shapes
    wide = {k: (torch.zeros(1, 256, 1280) if k == "pos_embed" else v) for k, v in official.state_dict().items()}
    path = tmp_path / "v2.bin"
    torch.save(wide, path)
    monkeypatch.setitem(PRESETS, "virchow2", dataclasses.replace(
        PRESETS["virchow2"], kwargs={**PRESETS["virchow2"].kwargs, "depth": 1}))
    with pytest.raises(WsiMilError, match=r"pos_embed has shape \(1, 256, 1280\) in the file, \(1, 261, 1280\)"):
        build_encoder(EncoderConfig(name="virchow2", weights=path))


def test_resnet50_trunc_takes_timm_torchvision_and_clam_files(tmp_path):
    import torchvision

    tv = torchvision.models.resnet50().eval()
    files = {"torchvision.pth": tv.state_dict(),
             "timm.safetensors": timm.create_model("resnet50", num_classes=1000).state_dict(),
             "clam.pth": {k: v for k, v in tv.state_dict().items() if not k.startswith(("layer4.", "fc."))}}
    for fname, state in files.items():
        path = tmp_path / fname
        if fname.endswith(".safetensors"):
            from safetensors.torch import save_file

            save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        else:
            torch.save(state, path)
        enc = build_encoder(EncoderConfig(name="resnet50_trunc", weights=path))
        assert enc.dim == 1024, fname


def test_a_hub_file_that_does_not_fit_is_not_blamed_on_the_network():
    from wsi_mil.features.encoders.build import _hub_error

    fit = _hub_error("virchow2", "hf-hub:paige-ai/Virchow2", RuntimeError(
        "Error(s) in loading state_dict for VisionTransformer:\n\tsize mismatch for pos_embed: copying a param "
        "with shape torch.Size([1, 261, 1280]) from checkpoint, the shape in current model is torch.Size([1, 256, 1280])."))
    assert "do not fit this preset's architecture" in str(fit) and "Offline" not in str(fit)
    net = _hub_error("uni", "hf-hub:MahmoodLab/uni", OSError("We couldn't connect to 'https://huggingface.co'"))
    assert "Unreachable (offline) or gated?" in str(net)


def test_gigapath_sees_its_native_scale_and_other_tiles_are_warned_once_and_recorded(tmp_path, slide, caplog,
                                                                                       monkeypatch):
    """The old path resized a whole 256-px tile to 224 for Prov-GigaPath (0.571 µm/px); its card resizes to
    256 and centre-crops 224. Tiles of another geometry are extracted with one warning and model_mpp."""
    torch.manual_seed(0)
    official, pooled, card_tf, (fmt, state), overrides = card("gigapath")
    weights = _save(state, tmp_path, fmt)
    _ours(monkeypatch, "gigapath", overrides, weights)
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / slide.name).symlink_to(slide)
    out = tmp_path / "out"
    common = ["--slides", str(slides), "--out", str(out), "--no-progress", "encoder.name=gigapath",
              f"encoder.weights={weights}", "extract.num_workers=0", "tiling.patch_size=224"]
    assert main(["tile", *common]) == 0
    with caplog.at_level("WARNING"):
        assert main(["extract", *common]) == 0
    warnings = [r.getMessage() for r in caplog.records if "was made for 256-px tiles" in r.getMessage()]
    assert len(warnings) == 1 and "0.5 µm/px" in warnings[0], warnings
    with h5py.File(Layout(out).features("gigapath", slide.stem)) as fh:
        assert fh["features"].attrs["model_mpp"] == pytest.approx(0.5 * 224 / 256)
        assert fh["features"].attrs["native_tile_px"] == 256


def test_features_of_two_geometries_never_share_a_folder(tmp_path, slide, capsys):
    slides = tmp_path / "slides"
    slides.mkdir()
    (slides / "a.svs").symlink_to(slide)
    (slides / "b.svs").symlink_to(slide)
    out = tmp_path / "out"
    enc = ["encoder.name=resnet18", "encoder.pretrained=false", "extract.num_workers=0"]
    base = ["--out", str(out), "--no-progress", *enc]
    assert main(["tile", "--slides", str(slides), *base]) == 0
    (slides / "b.svs").unlink()
    assert main(["extract", "--slides", str(slides), *base]) == 0
    (slides / "b.svs").symlink_to(slide)
    (slides / "a.svs").unlink()
    assert main(["tile", "--slides", str(slides), *base, "tiling.patch_size=128", "--overwrite"]) == 0
    assert main(["extract", "--slides", str(slides), *base]) == 1
    from wsi_mil.runner import read_manifest

    row = {(r["slide_id"], r["stage"]): r for r in read_manifest(out / "manifest.csv")}[("b", "extract")]
    assert row["status"] == "failed" and "256-px tiles" in row["reason"] and "128 px" in row["reason"]


def test_wsi_mil_encoders_lists_every_preset_with_its_width_and_the_readme_carries_the_same_table(capsys):
    from wsi_mil.features.encoders import EXTRAS
    from wsi_mil.features.encoders.table import markdown_extras, markdown_table

    assert main(["encoders"]) == 0
    table, _, extras = capsys.readouterr().out.partition("\n\n")
    rows = {line.split()[0]: line.split()[1] for line in table.splitlines()[1:]}
    assert set(rows) == set(PRESETS) and len(PRESETS) >= 24
    assert rows["virchow2"] == "2560" and rows["phikon"] == "768" and rows["resnet50_trunc"] == "1024"
    assert rows["midnight12k"] == "3072" and rows["virchow2_cls"] == "1280" and rows["conch_v15"] == "768"
    assert all(f"  {name}:" in extras for name in EXTRAS)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert markdown_table() in readme, "regenerate the README's encoder table (wsi_mil.features.encoders.table)"
    assert markdown_extras() in readme



def test_phikon_has_a_real_hub_path_that_is_one_line_offline(tmp_path):
    """Phikon had no weights source at all; now its published transformers file is fetched and converted."""
    import subprocess
    import sys

    write_slide(tmp_path / "s.svs", SyntheticSpec(width=600, height=500, mpp=0.5, seed=1))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    r = subprocess.run([sys.executable, "-m", "wsi_mil.cli", "extract", "--slides", str(tmp_path), "--out",
                        str(tmp_path / "out"), "encoder.name=phikon"], capture_output=True, text=True, env=env)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "owkin/phikon/pytorch_model.bin" in lines[0] and "Unreachable (offline) or gated?" in lines[0]


def test_a_corrupt_weights_file_is_one_line(tmp_path, capsys):
    for name in ("w.safetensors", "w.pth"):
        bad = tmp_path / name
        bad.write_bytes(b"not weights at all")
        with pytest.raises(WsiMilError, match=f"encoder.weights: .*{name}"):
            build_encoder(EncoderConfig(name="resnet50_trunc", weights=bad))


def test_conch_v15_file_of_another_grid_is_resampled_as_its_authors_loader_does(tmp_path, monkeypatch):
    """A published trunk.pos_embed of a 28 x 28 grid: the authors' loader resamples it to the trunk's 14 x 14
    (bilinear, no antialias) before loading; ours must give the same feature, not a shape error."""
    from timm.layers import resample_abs_pos_embed

    torch.manual_seed(1)
    official, pooled, _, (fmt, state), overrides = card("conch_v15")
    official.eval()
    wide = torch.randn(1, 1 + 28 * 28, 1024) * 0.02
    with torch.no_grad():
        official.trunk.pos_embed.copy_(resample_abs_pos_embed(wide, new_size=(14, 14), num_prefix_tokens=1,
                                                              interpolation="bilinear", antialias=False))
    weights = _save({**official.state_dict(), "trunk.pos_embed": wide}, tmp_path, fmt)
    enc = _ours(monkeypatch, "conch_v15", overrides, weights)
    x = torch.randn(2, 3, 448, 448)
    with torch.inference_mode():
        assert float((enc.model(x) - official(x)).abs().max()) < 1e-5


@pytest.mark.parametrize("name", ["conch_v1", "musk"])
def test_an_extra_without_its_authors_package_is_one_line_naming_what_to_install(name, tmp_path):
    """CONCH v1 and MUSK need their authors' package (not on PyPI): without it, one error line, exit 2."""
    import importlib.util
    import subprocess
    import sys

    from wsi_mil.features.encoders import EXTRAS

    package = EXTRAS[name][1]
    if importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here")
    write_slide(tmp_path / "s.svs", SyntheticSpec(width=600, height=500, mpp=0.5, seed=1))
    r = subprocess.run([sys.executable, "-m", "wsi_mil.cli", "extract", "--slides", str(tmp_path), "--out",
                        str(tmp_path / "out"), f"encoder.name={name}"], capture_output=True, text=True)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and f"'{package}'" in lines[0] and "pip install" in lines[0]
