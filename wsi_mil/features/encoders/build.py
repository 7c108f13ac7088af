"""Building an encoder: a preset's recipe (or any timm name) with weights from a file, the hub, or random.

Anything that is not a preset is passed to timm as is (``resnet18``, ``hf-hub:org/model``, ...), with the
input size and normalisation of its pretrained config. The feature dimension is measured from a forward
pass, never written down.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ...atomic import file_sha256
from ...config import EncoderConfig
from ...layout import encoder_id
from .extras import EXTRAS, build_extra
from .registry import PRESETS, Preset, Transform
from .weights import EncoderError, load_into, load_state_dict


class _ClsPlusMeanTokens(nn.Module):
    """Virchow's embedding (model card): the class token concatenated with the mean of the patch tokens,
    the register tokens left out."""

    def __init__(self, vit: nn.Module):
        super().__init__()
        self.vit = vit

    def forward(self, x):
        tokens = self.vit.forward_features(x)
        prefix = getattr(self.vit, "num_prefix_tokens", 1)
        return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=-1)


POOLS = {"model": lambda m: m, "cls+mean": _ClsPlusMeanTokens}


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
    transform: Transform | None = None  # the official geometry (presets); None: resize to input_size
    preset: Preset | None = None

    @property
    def geometry(self) -> Transform | int:
        """What the patch dataset does to a tile: the preset's official transform, or a plain resize."""
        return self.transform or self.input_size


def _create(arch: str, kwargs: dict, pretrained: bool) -> nn.Module:
    import timm

    from .registry import swiglu

    kw = dict(kwargs)
    if kw.pop("_swiglu", False):
        kw = swiglu(**kw)
    return timm.create_model(arch, pretrained=pretrained, num_classes=0, **kw)


def _hub_error(name: str, hub: str, exc: Exception) -> EncoderError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if "size mismatch" in str(exc) or "Error(s) in loading state_dict" in str(exc):
        return EncoderError(f"encoder '{name}': the hub's weights ({hub}) do not fit this preset's architecture: "
                            f"{reason[:200]}")
    return EncoderError(
        f"encoder '{name}': could not get pretrained weights from the hub ({hub}): {reason[:160]}. "
        f"Unreachable (offline) or gated? Download them once and pass encoder.weights=/path/to/weights "
        f"(.safetensors, .pth or .bin), or set encoder.pretrained=false for random weights"
    )


def _from_hub(name: str, hub: str, arch_kwargs: dict) -> nn.Module:
    try:
        return _create(hub, arch_kwargs, pretrained=True)
    except (OSError, ConnectionError, TimeoutError, RuntimeError) as exc:
        raise _hub_error(name, hub, exc) from None
    except Exception as exc:
        if type(exc).__module__.startswith(("huggingface_hub", "requests", "httpx", "urllib3")):
            raise _hub_error(name, hub, exc) from None
        raise


def _hub_download(name: str, repo: str, filename: str) -> Path:
    """A published weights file from the hub (or its cache); unreachable or gated is one line."""
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id=repo, filename=filename))
    except Exception as exc:  # offline, gated, missing: huggingface_hub and requests raise their own types
        raise _hub_error(name, f"{repo}/{filename}", exc) from None


def _random(name: str, arch: str, kwargs: dict) -> nn.Module:
    try:
        with torch.random.fork_rng(devices=[]):  # random init is reproducible: seed 0, global RNG untouched
            torch.manual_seed(0)
            return _create(arch, kwargs, pretrained=False)
    except RuntimeError as exc:
        raise EncoderError(f"encoder '{name}': {str(exc).splitlines()[0]}") from None


def _trunk(cfg: EncoderConfig, preset: Preset | None) -> tuple[nn.Module, str, str | None]:
    """The timm trunk with its weights (file, hub or random), truncated as the preset says."""
    arch = preset.arch if preset else cfg.name
    kwargs = dict(preset.kwargs) if preset else {}
    prepare = (preset.build if preset and preset.build else (lambda m: m))
    if cfg.weights is not None:
        path = Path(cfg.weights)
        state = load_state_dict(path)
        model = prepare(_create(arch, kwargs, pretrained=False))
        load_into(model, state, cfg.name, f"encoder.weights {path.name}", preset)
        return model, f"file:{path.resolve()}", file_sha256(path)
    if cfg.pretrained:
        hub = preset.hub if preset else cfg.name
        if hub is None and preset.hub_file:
            path = _hub_download(cfg.name, *preset.hub_file)
            model = prepare(_create(arch, kwargs, pretrained=False))
            load_into(model, load_state_dict(path), cfg.name, f"hub file {'/'.join(preset.hub_file)}", preset)
            return model, f"hub:{'/'.join(preset.hub_file)}", file_sha256(path)
        if hub is None:
            raise EncoderError(f"encoder '{cfg.name}': {preset.note}")
        return prepare(_from_hub(cfg.name, hub, kwargs)), f"hub:{hub}", None
    return prepare(_random(cfg.name, arch, kwargs)), "random_init", None


def recipe(name: str) -> Preset | None:
    """The authors' recipe of a preset or an optional extra; None for a plain timm name."""
    return PRESETS.get(name) or (EXTRAS[name][0] if name in EXTRAS else None)


def _encoder(cfg: EncoderConfig, preset: Preset, model: nn.Module, source: str, sha: str | None) -> Encoder:
    model.eval()
    enc = Encoder(cfg.name, encoder_id(cfg.name), model, preset.input_size, preset.mean, preset.std,
                  preset.precision, source, sha, transform=preset.transform, preset=preset)
    enc.dim = feature_dim(model, enc.input_size)
    return enc


def build_encoder(cfg: EncoderConfig) -> Encoder:
    """Build the configured encoder on CPU in eval mode, its weights from a file, the hub, or random."""
    import timm

    if cfg.name in EXTRAS:  # built by its authors' package, with their weights
        weights = Path(cfg.weights) if cfg.weights is not None else None
        model = build_extra(cfg.name, weights, cfg.pretrained)
        source = f"file:{weights.resolve()}" if weights else f"hub:{EXTRAS[cfg.name][1]} package"
        return _encoder(cfg, EXTRAS[cfg.name][0], model, source, file_sha256(weights) if weights else None)
    preset = PRESETS.get(cfg.name)
    model, source, sha = _trunk(cfg, preset)
    if preset:
        return _encoder(cfg, preset, POOLS[preset.pool](model), source, sha)
    data_cfg = timm.data.resolve_model_data_config(model)
    model.eval()
    enc = Encoder(cfg.name, encoder_id(cfg.name), model, int(data_cfg["input_size"][-1]), tuple(data_cfg["mean"]),
                  tuple(data_cfg["std"]), "bf16", source, sha)
    enc.dim = feature_dim(model, enc.input_size)
    return enc


def feature_dim(model: nn.Module, input_size: int) -> int:
    """Measure the output width with one forward pass (on the meta device when the model lives there)."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    with torch.inference_mode():
        out = model(torch.zeros(1, 3, input_size, input_size, device=device))
    return int(out.shape[-1])
