"""Weight files as their authors publish them, brought to timm's key names, and checked before loading.

Formats (``Preset.formats``): ``timm`` and ``torchvision`` (the same key names), ``clam`` (CLAM's
ResNet-50 truncated after layer 3: torchvision names without ``layer4``), ``conch`` (CONCH v1.5's
``pytorch_model_vision.bin``: ``trunk.*`` and the pooler, its ``pos_embed`` resampled by the preset), ``transformers`` (a
``ViTModel`` such as Phikon's, a ``Dinov2Model`` such as Phikon-v2's or Midnight's (SwiGLU
``weights_in/out``), or a DINOv2 with registers such as Hibou's: query/key/value merged into timm's ``qkv``,
LayerScale ``lambda1`` -> ``gamma``, registers -> ``reg_token``).
Classifier heads (``fc``, ``head``, ``pooler``, ``classifier``) are dropped, as are the keys a preset's
truncation removes. A file that still does not fit is one line naming the keys, or the first key whose
shape differs with both shapes; nothing is loaded half-way.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from torch import nn

from ...errors import WsiMilError

HEADS = ("fc.", "head.", "head_dist.", "pooler.", "classifier.")


class EncoderError(WsiMilError):
    pass


def load_state_dict(path: Path) -> dict:
    """A state dict from ``.safetensors`` or, with ``weights_only=True``, ``.pth``/``.bin``/``.pt``."""
    if not path.is_file():
        raise EncoderError(f"encoder.weights: file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:  # SafetensorError: truncated or not a safetensors file
            raise EncoderError(f"encoder.weights: {path.name} is not a readable safetensors file: "
                               f"{str(exc).splitlines()[0][:160]}") from None
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


_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)$")
_HF_BLOCK = {  # ViTModel (iBOT, Phikon) and Dinov2Model (Phikon-v2) block names -> timm's
    "attention.output.dense": "attn.proj", "layernorm_before": "norm1", "layernorm_after": "norm2",
    "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
    "norm1": "norm1", "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    "layer_scale1": "ls1", "layer_scale2": "ls2", "mlp.weights_in": "mlp.fc1", "mlp.weights_out": "mlp.fc2",
}
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.position_embeddings": "pos_embed",
           "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
           "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}


_HF_V5 = [  # transformers >= 5 names the same tensors differently; published files use the names below
    (re.compile(r"^(?:layers|encoder\.layer)\.(\d+)\.attention\.q_proj\."), r"encoder.layer.\1.attention.attention.query."),
    (re.compile(r"^(?:layers|encoder\.layer)\.(\d+)\.attention\.k_proj\."), r"encoder.layer.\1.attention.attention.key."),
    (re.compile(r"^(?:layers|encoder\.layer)\.(\d+)\.attention\.v_proj\."), r"encoder.layer.\1.attention.attention.value."),
    (re.compile(r"^(?:layers|encoder\.layer)\.(\d+)\.attention\.o_proj\."), r"encoder.layer.\1.attention.output.dense."),
    (re.compile(r"^layers\.(\d+)\.mlp\.fc1\."), r"encoder.layer.\1.intermediate.dense."),
    (re.compile(r"^layers\.(\d+)\.mlp\.fc2\."), r"encoder.layer.\1.output.dense."),
    (re.compile(r"^layers\.(\d+)\.(layernorm_before|layernorm_after)\."), r"encoder.layer.\1.\2."),
    (re.compile(r"^(encoder\.layer\.\d+\.mlp)\.down_proj\."), r"\1.weights_out."),
]
_GATE_UP = re.compile(r"^(encoder\.layer\.\d+\.mlp)\.(gate_proj|up_proj)\.(weight|bias)$")


def _published_names(key: str) -> str:
    for pattern, repl in _HF_V5:
        if pattern.match(key):
            return pattern.sub(repl, key)
    return key


def _merge_gate_up(state: dict) -> dict:
    """transformers 5 splits DINOv2's SwiGLU ``weights_in`` into ``gate_proj`` and ``up_proj``; the published
    files (and timm's packed ``fc1``) hold them stacked, the gate first."""
    out, halves = {}, {}
    for key, value in state.items():
        m = _GATE_UP.match(key)
        if m:
            halves.setdefault((m[1], m[3]), {})[m[2]] = value
        else:
            out[key] = value
    for (prefix, leaf), pair in halves.items():
        out[f"{prefix}.weights_in.{leaf}"] = torch.cat([pair["gate_proj"], pair["up_proj"]], 0)
    return out


def _registers(out: dict, registers) -> None:
    """DINOv2 with registers (transformers, Hibou) adds the position embedding to the class token and inserts
    the registers after it; timm's ``reg4`` models keep the class token out of ``pos_embed``: fold its
    position into it."""
    out["reg_token"] = registers
    out["cls_token"] = out["cls_token"] + out["pos_embed"][:, :1]
    out["pos_embed"] = out["pos_embed"][:, 1:]


def from_transformers_vit(state: dict) -> dict:
    """A transformers ``ViTModel`` or ``Dinov2Model`` state dict (``embeddings.*``, ``encoder.layer.N.*`` as
    published, or transformers 5's renamed keys) in timm's names: query/key/value concatenated into
    ``qkv``, ``layernorm_before/after`` -> ``norm1/2``, ``intermediate``/``output.dense`` -> ``mlp.fc1/2``,
    ``layer_scale1/2.lambda1`` -> ``ls1/2.gamma``; ``mask_token`` and the pooler dropped."""
    state = _merge_gate_up({_published_names(k.removeprefix("vit.")): v for k, v in state.items()})
    out, qkv = {}, {}
    for key, value in state.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        m = _HF_LAYER.match(key)
        if m is None:
            continue  # mask_token, pooler: not part of the timm trunk
        block, rest = m.groups()
        part = re.match(r"^attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
        if part:
            qkv.setdefault((block, part[2]), {})[part[1]] = value
            continue
        name, _, leaf = rest.rpartition(".")
        if name in _HF_BLOCK:
            out[f"blocks.{block}.{_HF_BLOCK[name]}.{'gamma' if leaf == 'lambda1' else leaf}"] = value
    for (block, leaf), parts in qkv.items():
        out[f"blocks.{block}.attn.qkv.{leaf}"] = torch.cat([parts["query"], parts["key"], parts["value"]], 0)
    if "embeddings.register_tokens" in state:
        _registers(out, state["embeddings.register_tokens"])
    return out


def convert(state: dict, fmt: str) -> dict:
    return from_transformers_vit(state) if fmt == "transformers" else state


def detect_format(state: dict) -> str:
    if any(k.removeprefix("vit.").startswith("embeddings.patch_embeddings.") for k in state):
        return "transformers"
    return "timm"


def fit(model: nn.Module, state: dict, name: str, source: str) -> dict:
    """``state`` restricted to what ``model`` holds (heads and truncated parts dropped), or one line saying
    why it does not fit: the keys missing or left over, or the first shape that differs."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(HEADS)}
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    if missing or extra:
        def show(keys):
            return ", ".join(keys[:3]) + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "") or "none"

        raise EncoderError(f"{source} does not fit encoder '{name}': missing keys: {show(missing)}; "
                           f"unexpected keys: {show(extra)}")
    for key, value in own.items():
        if tuple(state[key].shape) != tuple(value.shape):
            raise EncoderError(f"{source} does not fit encoder '{name}': {key} has shape "
                               f"{tuple(state[key].shape)} in the file, {tuple(value.shape)} in the architecture")
    return state


def load_into(model: nn.Module, state: dict, name: str, source: str, preset=None) -> None:
    """``state`` in timm's names (converted from its format), the preset's truncated keys dropped and its
    authors' load-time fix-ups applied, loaded strictly after :func:`fit` checked it."""
    drop = preset.drop if preset else ()
    state = {k: v for k, v in convert(state, detect_format(state)).items() if not k.startswith(drop)}
    if preset is not None and preset.adapt is not None:
        state = preset.adapt(model, state)
    model.load_state_dict(fit(model, state, name, source), strict=True)
