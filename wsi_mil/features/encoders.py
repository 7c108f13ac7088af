"""Patch encoders: a registry of presets plus any timm model.

A preset names a local timm architecture (so it can be built offline, for ``encoder.weights`` or random
init), the hub id its pretrained weights come from, and its input size, normalisation, GPU precision and
pooling. Anything that is not a preset is passed to timm as is (``resnet18``, ``hf-hub:org/model``, ...).
Input size and normalisation come from the model's pretrained config when a preset does not set them.
The feature dimension is measured from a forward pass, never written down.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..atomic import file_sha256
from ..config import EncoderConfig
from ..errors import WsiMilError
from ..layout import encoder_id

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


class EncoderError(WsiMilError):
    pass


@dataclass(frozen=True)
class Preset:
    name: str
    arch: str  # local timm architecture
    hub: str | None  # where pretrained weights come from (None: not loadable through timm)
    kwargs: dict = field(default_factory=dict)
    input_size: int | None = None
    mean: tuple | None = None
    std: tuple | None = None
    precision: str = "fp16"  # on GPU
    build: Callable[[nn.Module], nn.Module] | None = None  # e.g. truncation or token pooling
    note: str = ""


PRESETS: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    PRESETS[preset.name] = preset
    return preset


def _kwargs_swiglu(**kw) -> dict:
    from timm.layers import SwiGLUPacked

    return {"mlp_layer": SwiGLUPacked, "act_layer": nn.SiLU, **kw}


class _TruncatedResNet(nn.Module):
    """ResNet-50 up to layer3, global average pooled (the 1024-d baseline of CLAM and others)."""

    def __init__(self, resnet: nn.Module):
        super().__init__()
        self.body = resnet
        self.body.layer4 = nn.Identity()

    def forward(self, x):
        return self.body.forward_head(self.body.forward_features(x), pre_logits=True)


class _ClsPlusMeanTokens(nn.Module):
    """Virchow-style embedding: class token concatenated with the mean of the patch tokens."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        tokens = self.vit.forward_features(x)
        prefix = getattr(self.vit, "num_prefix_tokens", 1)
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=-1)


register(Preset("resnet50_trunc", "resnet50.tv_in1k", "resnet50.tv_in1k", {}, 224, *IMAGENET,
                build=_TruncatedResNet, note="ImageNet ResNet-50 cut after layer 3, 1024-d"))
register(Preset("uni", "vit_large_patch16_224", "hf-hub:MahmoodLab/uni",
                {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
                224, *IMAGENET, "fp16", note="UNI ViT-L/16 (gated on the hub: accept the licence, log in)"))
register(Preset("uni2_h", "vit_giant_patch14_224", "hf-hub:MahmoodLab/UNI2-h",
                {"img_size": 224, "patch_size": 14, "depth": 24, "num_heads": 24, "init_values": 1e-5,
                 "embed_dim": 1536, "mlp_ratio": 2.66667 * 2, "no_embed_class": True, "reg_tokens": 8,
                 "dynamic_img_size": True, "_swiglu": True},
                224, *IMAGENET, "bf16", note="UNI2-h ViT-H/14 with registers (gated)"))
register(Preset("h_optimus_0", "vit_giant_patch14_reg4_dinov2", "hf-hub:bioptimus/H-optimus-0",
                {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": False},
                224, (0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517), "fp16",
                note="H-optimus-0 ViT-g/14 (gated)"))
register(Preset("virchow2", "vit_huge_patch14_224", "hf-hub:paige-ai/Virchow2",
                {"img_size": 224, "init_values": 1e-5, "mlp_ratio": 5.3375, "reg_tokens": 4,
                 "no_embed_class": True, "global_pool": "", "dynamic_img_size": True, "_swiglu": True},
                224, *IMAGENET, "fp16", build=_ClsPlusMeanTokens,
                note="Virchow2 ViT-H/14, class token + mean patch token (gated)"))
register(Preset("gigapath", "vit_giant_patch14_dinov2", "hf-hub:prov-gigapath/prov-gigapath",
                {"img_size": 224, "patch_size": 16, "embed_dim": 1536, "depth": 40, "num_heads": 24,
                 "init_values": 1e-5, "mlp_ratio": 5.33334},
                224, *IMAGENET, "fp16", note="Prov-GigaPath tile encoder ViT-g/16 (gated)"))
register(Preset("phikon", "vit_base_patch16_224", None, {"img_size": 224}, 224, *IMAGENET, "fp16",
                note="Phikon iBOT ViT-B/16: its weights are published in transformers format, which timm "
                     "does not load from the hub; convert them to timm keys and pass encoder.weights"))


@dataclass
class Encoder:
    """A ready model plus what the data path needs to feed it."""

    name: str
    encoder_id: str
    model: nn.Module
    input_size: int
    mean: tuple
    std: tuple
    gpu_precision: str
    weights_source: str
    weights_sha256: str | None = None
    dim: int = 0


def _create(arch: str, kwargs: dict, pretrained: bool) -> nn.Module:
    import timm

    kw = dict(kwargs)
    if kw.pop("_swiglu", False):
        kw = _kwargs_swiglu(**kw)
    return timm.create_model(arch, pretrained=pretrained, num_classes=0, **kw)


def load_state_dict(path: Path) -> dict:
    """A state dict from ``.safetensors`` or, with ``weights_only=True``, ``.pth``/``.bin``/``.pt``."""
    if not path.is_file():
        raise EncoderError(f"encoder.weights: file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise EncoderError(f"encoder.weights: cannot load {path.name} with weights_only=True: "
                               f"{str(exc).splitlines()[0]}") from None
    for key in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise EncoderError(f"encoder.weights: {path.name} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _load_into(model: nn.Module, path: Path, name: str) -> None:
    state = load_state_dict(path)
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        def show(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")

        raise EncoderError(
            f"encoder.weights {path.name} does not fit encoder '{name}': "
            f"missing keys: {show(result.missing_keys) or 'none'}; "
            f"unexpected keys: {show(result.unexpected_keys) or 'none'}"
        )


def _hub_error(name: str, hub: str, exc: Exception) -> EncoderError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return EncoderError(
        f"encoder '{name}': could not get pretrained weights from the hub ({hub}): {reason[:160]}. "
        f"Offline or gated? Download them once and pass encoder.weights=/path/to/weights.safetensors "
        f"(or .pth/.bin), or set encoder.pretrained=false for random weights"
    )


def build_encoder(cfg: EncoderConfig) -> Encoder:
    """Build the configured encoder on CPU in eval mode, its weights from a file, the hub, or random."""
    import timm

    preset = PRESETS.get(cfg.name)
    arch = preset.arch if preset else cfg.name
    kwargs = dict(preset.kwargs) if preset else {}
    hub = preset.hub if preset else cfg.name
    sha = None
    if cfg.weights is not None:
        model = _create(arch, kwargs, pretrained=False)
        inner = model
        _load_into(inner, Path(cfg.weights), cfg.name)
        source, sha = f"file:{Path(cfg.weights).resolve()}", file_sha256(Path(cfg.weights))
    elif cfg.pretrained:
        if hub is None:
            raise EncoderError(f"encoder '{cfg.name}': {preset.note}")
        try:
            model = _create(hub, kwargs, pretrained=True)
        except (OSError, ConnectionError, TimeoutError, RuntimeError) as exc:
            raise _hub_error(cfg.name, hub, exc) from None
        except Exception as exc:
            if type(exc).__module__.startswith(("huggingface_hub", "requests", "httpx", "urllib3")):
                raise _hub_error(cfg.name, hub, exc) from None
            raise
        source = f"hub:{hub}"
    else:
        try:
            with torch.random.fork_rng(devices=[]):  # random init is reproducible: seed 0, global RNG untouched
                torch.manual_seed(0)
                model = _create(arch, kwargs, pretrained=False)
        except RuntimeError as exc:
            raise EncoderError(f"encoder '{cfg.name}': {str(exc).splitlines()[0]}") from None
        source = "random_init"
    data_cfg = timm.data.resolve_model_data_config(model)
    if preset and preset.build is not None:
        model = preset.build(model)
    input_size = (preset.input_size if preset and preset.input_size else None) or int(data_cfg["input_size"][-1])
    mean = (preset.mean if preset and preset.mean else None) or tuple(data_cfg["mean"])
    std = (preset.std if preset and preset.std else None) or tuple(data_cfg["std"])
    model.eval()
    enc = Encoder(cfg.name, encoder_id(cfg.name), model, input_size, tuple(mean), tuple(std),
                  preset.precision if preset else "bf16", source, sha)
    enc.dim = feature_dim(model, input_size)
    return enc


def feature_dim(model: nn.Module, input_size: int) -> int:
    """Measure the output width with one forward pass (on the meta device when the model lives there)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, input_size, input_size, device=device))
    return int(out.shape[-1])
