"""Typed, validated configuration.

One pydantic model per section; unknown keys and bad values (including NaN and infinity) are rejected
with one line that names the dotted key. ``wsi_mil/default.yaml`` (shipped in the package, linked from
``configs/default.yaml``) documents every key and is checked against these defaults in tests;
``wsi-mil config`` prints the effective configuration in the same commented form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .userfiles import read_text

WSI_EXTENSIONS = [".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif",
                  ".vsi", ".czi", ".isyntax"]  # the last three are found so each fails with its one-line reason


THRESHOLD_RULE = r"^(youden|sensitivity@(0?\.\d+|1(\.0+)?)|0?\.\d+)$"  # train.threshold's grammar

DEFAULT_YAML = Path(__file__).with_name("default.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SlidesConfig(Section):
    backend: str = Field("auto", pattern=r"^[a-z0-9_]+$")  # auto, or a registered backend (wsi_mil.slide.backends)
    default_mpp: float | None = Field(None, gt=0)
    mpp_csv: Path | None = None
    recursive: bool = False
    extensions: list[str] = Field(default_factory=lambda: list(WSI_EXTENSIONS))
    dicom_id_attribute: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9]*$")  # e.g. ContainerIdentifier


class TissueConfig(Section):
    mpp: float = Field(8.0, gt=0)
    method: Literal["saturation", "grey"] = "saturation"
    median_ksize: int = Field(5, ge=1)
    threshold_min: int = Field(15, ge=0, le=255)
    close_um: float = Field(32.0, ge=0)
    min_area_um2: float = Field(20000.0, ge=0)
    max_hole_area_um2: float = Field(20000.0, ge=0)
    remove_pen: bool = True
    remove_black: bool = True
    geojson_dir: Path | None = None

    @field_validator("median_ksize")
    @classmethod
    def _odd(cls, v: int) -> int:
        if v % 2 == 0:
            raise ValueError("must be odd")
        return v


class TilingConfig(Section):
    target_mpp: float = Field(0.5, gt=0)
    patch_size: int = Field(256, ge=8)
    overlap: float = Field(0.0, ge=0, lt=1)
    min_tissue_fraction: float = Field(0.25, ge=0, le=1)


class EncoderConfig(Section):
    name: str = "resnet50_trunc"
    pretrained: bool = True
    weights: Path | None = None


class ExtractConfig(Section):
    batch_size: int = Field(0, ge=0)
    num_workers: int = Field(-1, ge=-1)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False
    read_group: int = Field(8, ge=1)
    feature_dtype: Literal["float32", "float16"] = "float32"


class ModelConfig(Section):
    # any name registered in wsi_mil.mil.models, checked against the registry when training starts;
    # several, comma-separated, train each on the same splits
    name: str = "abmil_gated"
    hidden_dim: int = Field(256, ge=1)
    attention_dim: int = Field(128, ge=1)
    dropout: float = Field(0.25, ge=0, lt=1)
    embed_dim: int | None = Field(None, ge=1)
    kwargs: dict[str, Any] = Field(default_factory=dict)  # options of that model only (see its docstring)

    @field_validator("name")
    @classmethod
    def _names(cls, v: str) -> str:
        names = [n.strip() for n in v.split(",")]
        if not all(names):
            raise ValueError("must be one or more model names, comma-separated")
        return ",".join(names)

    @property
    def names(self) -> list[str]:
        return self.name.split(",")


class SurvivalConfig(Section):
    loss: Literal["nll", "cox"] = "nll"  # discrete-time NLL (Zadeh & Mahmood 2021) | Cox partial likelihood
    bins: int = Field(4, ge=1)  # NLL intervals, cut at quantiles of the training fold's uncensored times
    alpha: float = Field(0.0, ge=0, le=1)  # NLL: weight of the uncensored term
    time_column: str = "time"
    event_column: str = "event"  # 1: event observed, 0: censored
    groups: int = Field(2, ge=2)  # km.png: risk groups at quantiles of the out-of-fold risk (2: median split)
    monitor: Literal["loss", "c_index"] = "loss"  # early stopping on the validation loss or c-index


class TrainConfig(Section):
    task: str = Field("classification", pattern=r"^[a-z0-9_]+$")  # a registered task (wsi_mil.mil.tasks)
    survival: SurvivalConfig = Field(default_factory=SurvivalConfig)
    loss: Literal["mse", "huber"] = "mse"  # regression: on the target standardised on the training fold
    label_columns: list[str] = Field(default_factory=list)  # multilabel: the 0/1 columns, one output each
    threshold: str = Field("0.5", pattern=THRESHOLD_RULE)  # binary: youden | sensitivity@x | x (mil.threshold)
    bag_level: Literal["slide", "patient"] = "slide"  # patient: a patient's slides form one bag
    labels: Path | None = None
    features: Path | None = None
    run_name: str = "default"
    folds: int = Field(5, ge=1)
    epochs: int = Field(40, ge=1)
    min_epochs: int = Field(5, ge=0)
    patience: int = Field(8, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    optimizer: Literal["adam", "adamw"] = "adamw"
    betas: tuple[float, float] = (0.9, 0.999)
    batch_size: int = Field(1, ge=1)
    accumulate: int = Field(1, ge=1)
    max_instances: int | None = Field(None, ge=1)
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: bool = True  # bf16 autocast on CUDA, and on CPUs with native bf16 (AVX512-BF16 / AMX); fp32 elsewhere
    cache_gb: float = Field(8.0, ge=0)
    cache_dtype: Literal["float32", "float16"] = "float32"
    num_workers: int = Field(0, ge=0)
    balance: Literal["none", "weighted_loss", "sampler"] = "weighted_loss"
    val_fraction: float = Field(0.2, ge=0, lt=1)
    missing: Literal["skip", "error"] = "skip"
    split_column: str | None = None
    fold_label_case: bool = False
    seed: int = 0


class HeatmapConfig(Section):
    run: str | None = None
    mpp: float | None = Field(8.0, gt=0)
    downsample: float | None = Field(None, gt=0)
    smooth_sigma_um: float = Field(0.0, ge=0)
    cmap: str = "jet"
    alpha: float = Field(0.5, ge=0, le=1)
    top_k: int = Field(8, ge=0)
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    refine: bool = False
    refine_overlap: float = Field(0.5, gt=0, lt=1)
    # names registered in wsi_mil.heatmap.export (checked against that registry before a batch starts)
    exports: list[str] = Field(default_factory=lambda: ["png", "tiff", "geojson", "zarr", "patches"])


class EvaluateConfig(Section):
    bootstrap: int = Field(1000, ge=0)  # resamples over patients for each metric's 95% interval (0: none)
    seed: int = 0


class RunnerConfig(Section):
    executor: Literal["serial", "process", "dask"] = "serial"
    workers: int = Field(0, ge=0)
    overwrite: bool = False
    dask_address: str | None = None
    retries: int = Field(2, ge=0)


class Config(Section):
    slides: SlidesConfig = Field(default_factory=SlidesConfig)
    tissue: TissueConfig = Field(default_factory=TissueConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    encoder: EncoderConfig = Field(default_factory=EncoderConfig)
    extract: ExtractConfig = Field(default_factory=ExtractConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    heatmap: HeatmapConfig = Field(default_factory=HeatmapConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    runner: RunnerConfig = Field(default_factory=RunnerConfig)


def _format_error(err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        return f"config error: unknown key '{key}'"
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return f"config error: {key}: {first['msg']}{shown}"


def set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"config error: '{key}': '{part}' is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(pairs: list[str]) -> dict:
    """Turn ``["tiling.target_mpp=0.25", ...]`` into a nested dict; values are parsed as YAML scalars."""
    data: dict = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"config error: override '{pair}' is not key=value")
        key, raw = pair.split("=", 1)
        set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return data


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config error: file not found: {path}")
        try:
            data = yaml.safe_load(read_text(path, "config")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config error: {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config error: {path} must hold a mapping of sections")
    if overrides:
        extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
        data = _merge(data, extra)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_error(err)) from None


def config_to_dict(cfg: BaseModel) -> dict:
    return cfg.model_dump(mode="json")


def _flow(value: Any) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, allow_unicode=True, width=10_000).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def render_config(cfg: Config) -> str:
    """The effective config as YAML, with default.yaml's comments on every key."""
    values = config_to_dict(cfg)
    out, path = [], []  # path: (indent, name) of the sections enclosing the line
    for line in DEFAULT_YAML.read_text(encoding="utf-8").splitlines():
        body, sep, comment = line.partition("  #") if not line.lstrip().startswith("#") else (line, "", "")
        key, colon, rest = body.partition(":")
        name = key.strip()
        if not colon or not name or name.startswith("#"):
            out.append(line)
            continue
        indent = len(key) - len(key.lstrip())
        path = [(i, n) for i, n in path if i < indent]
        if not rest.strip():  # a section (or subsection) header
            path.append((indent, name))
            out.append(line)
            continue
        node = values
        for _, n in path:
            node = node.get(n, {})
        value = node.get(name, None)
        text = f"{key}: {_flow(value)}"
        out.append(f"{text:<26} #{comment}" if sep else text)
    rendered = "\n".join(out) + "\n"
    assert yaml.safe_load(rendered) == values, "render_config lost a value"
    return rendered
