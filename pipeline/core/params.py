"""The typed schema of params.yaml, and loading with clear errors.

Every error names the file, the key path and what was expected, and the CLI turns it into exit code
2 with no traceback. Extractor and model sections are validated by the `Config` class that the
registered extractor/model declares, so adding one never touches this file: the caller hands the
registries in (`load_params(..., registries=...)`), because this module sits below them.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.core.errors import VmrError
from pipeline.core.registry import Registry


class ParamsError(VmrError):
    """Bad params: the message names the file, the key path and what was expected."""


class Section(BaseModel):
    """Base of every params section: unknown keys are errors, values are immutable, numbers finite."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


# Domains of numeric hyper-parameters. Every number in a section is finite (allow_inf_nan=False);
# these say which range it must be in. Use them as the field's type, so that a subclass that
# changes the default keeps the domain (a bare `epochs: int = 18` would drop a parent's Field).
Count = Annotated[int, Field(ge=1)]
NonNegativeInt = Annotated[int, Field(ge=0)]
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
# -- sections -------------------------------------------------------------------------------------


class SynthParams(Section):
    seed: int = 0
    out_dir: str = "data/synth"
    num_train: int = Field(64, ge=1)
    num_test: int = Field(16, ge=1)
    fps: float = Field(30.0, gt=0)
    width: int = Field(320, ge=32)
    height: int = Field(240, ge=32)
    min_duration: float = Field(10.0, gt=0)
    max_duration: float = Field(30.0, gt=0)
    min_events: int = Field(2, ge=1)
    max_events: int = Field(4, ge=1)
    glove_dim: int = Field(300, ge=1)

    @model_validator(mode="after")
    def _ranges(self) -> SynthParams:
        if self.max_duration < self.min_duration:
            raise ValueError("max_duration must be >= min_duration")
        if self.max_events < self.min_events:
            raise ValueError("max_events must be >= min_events")
        return self


class DatasetParams(Section):
    """Which annotation files the vocab/train/evaluate stages read, and how to parse and clean them."""

    name: str = "synthetic"
    # parser name (pipeline.text.annotations.FORMATS)
    format: Literal[
        "charades_sta", "grounding_json", "cpl_json", "tacos_json", "qvhighlights", "msrvtt_csv", "msrvtt_json",
        "video_captions",
    ] = "charades_sta"
    video_dir: str = "data/synth/videos"  # the raw videos, <video id>.<ext> (read by `vmr decode`)
    splits: dict[str, str] = Field(
        default_factory=lambda: {
            "train": "data/synth/annotations/charades_sta_train.txt",
            "test": "data/synth/annotations/charades_sta_test.txt",
        }
    )
    # Charades-style csv files with a `length` column (durations), for formats that need them.
    # Empty or null (charades_sta): each video's duration as `vmr decode` measured it.
    durations: list[str] = Field(
        default_factory=lambda: [
            "data/synth/annotations/Charades_v1_train.csv",
            "data/synth/annotations/Charades_v1_test.csv",
        ]
    )
    cleaning: Literal["none", "mmn", "mesm", "cnm"] = "mmn"  # named policy (pipeline.text.annotations)
    on_error: Literal["raise", "skip"] = "raise"  # malformed records: fail, or count and report them
    video_captions: str | None = "data/synth/annotations/video_captions.json"

    @field_validator("durations", mode="before")
    @classmethod
    def _null_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value

    @property
    def durations_from_decode(self) -> bool:
        """True when the queries' video durations come from decode's records, not from csv files."""
        return self.format == "charades_sta" and not self.durations


class DecodeParams(Section):
    """`vmr decode`: the videos of `dataset.video_dir` -> frame store (pipeline/media/decode.py,
    docs/features.md)."""

    out_dir: str = "work/frames"
    workers: int = Field(2, ge=1)  # decode processes
    timeout_s: float = Field(120.0, gt=0)  # per video; the worker is killed past it (decord deadlocks)
    recycle_after: int = Field(32, ge=1)  # videos per worker before it is replaced (decord leaks)
    max_failure_share: float = Field(0.0, ge=0, le=1)  # exit non-zero when more videos than this fail
    # pyav: faster and FFmpeg's own scaling (docs/features.md); decord: rotated files and decord's
    # own failures (a hang included) go through PyAV
    backend: Literal["decord", "pyav"] = "pyav"
    # which protocols' frames decode writes (a cache): sparse = at most 1 frame/s (CLIP); the others
    # are decoded again by extract from the recorded plan (pipeline/media/replay.py). Frames of models
    # that train on pixels are always stored. docs/features.md has the measurements.
    store_frames: Literal["none", "sparse", "all"] = "sparse"


class MergeParams(Section):
    """`vmr extract` writes `npy_dir`/<feature>/; `vmr merge` reads it into `out_dir`/<feature>.h5."""

    npy_dir: str = "work/npy"
    out_dir: str = "features"
    dtype: Literal["float32", "float16"] = "float32"
    compression: Literal["none", "gzip", "lzf"] = "none"
    layout: Literal["flat", "activitynet"] = "flat"  # h5[vid] or h5[vid]["c3d_features"]
    export_npz_dir: str | None = None  # also write Moment-DETR-style <vid>.npz {"features"} here


class ExtractParams(Section):
    """`vmr extract`: where the batch plan runs. Both engines write the same bytes."""

    engine: Literal["local", "ray"] = "local"  # ray: the optional extra (pip install -e '.[ray]')


class RayParams(Section):
    """`extract.engine: ray` (pipeline/media/ray_engine.py, docs/cluster.md)."""

    address: str | None = None  # null: start a local Ray instance; else a cluster's ("auto", host:port)
    num_cpus: Annotated[int, Field(ge=1)] | None = None  # CPUs of a local instance; null: the machine's
    actors: Count = 1  # model actors per extractor: one per GPU
    gpus_per_actor: NonNegative = 0.0  # 1 on a GPU cluster
    cpus_per_actor: NonNegative = 1.0
    cpus_per_decode: Positive = 1.0  # CPUs each decode task (load + group one video) reserves
    videos_ahead: Count = 8  # decode tasks running ahead of the batch plan (bounds memory)
    max_restarts: NonNegativeInt = 3  # of a dead actor, and retries of a task whose worker died

    @model_validator(mode="after")
    def _local_only(self) -> RayParams:
        if self.address is not None and self.num_cpus is not None:
            raise ValueError("num_cpus sizes a local instance; a cluster at `address` has its own")
        return self


class ImportParams(Section):
    """`imports.<name>`: a published feature file read in as `merge.out_dir`/<name>.h5 (docs/import.md).

    The names are checked against pipeline.media.importers (LAYOUTS, PUBLISHED) by a test."""

    path: str  # the released file (HDF5) or folder (one .npz/.npy per video or query)
    # a known release (feature_protocols.md): its layout, key, row times and dim are the defaults
    published: Literal[
        "qvhighlights_clip", "qvhighlights_slowfast", "qvhighlights_clip_text", "charades_clip",
        "charades_slowfast", "charades_vgg", "charades_vgg_umt", "charades_i3d", "tacos_c3d", "activitynet_c3d",
    ] | None = None
    layout: Literal["npz_dir", "npy_dir", "hdf5_flat", "hdf5_activitynet", "query_npz_dir"] | None = None
    key: str | None = None  # the array in each .npz / ActivityNet group (default: the layout's)
    seconds_per_row: Positive | None = None  # from one row to the next (default: the release's)
    window_seconds: Positive | None = None  # the span of one row (default: the release's, else seconds_per_row)
    sha256: Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")] | None = None  # expected digest of `path`

    @model_validator(mode="after")
    def _layout_known(self) -> ImportParams:
        if self.layout is None and self.published is None:
            raise ValueError("give `layout` or `published`")
        return self


class VocabParams(Section):
    """`vmr vocab`. `splits` are counted in order (MESM counted train+test; default: train only)."""

    out_dir: str = "vocab"
    splits: list[str] = Field(default_factory=lambda: ["train"], min_length=1)
    glove_file: str | None = "data/synth/glove.synthetic.300d.txt"  # GloVe text; null: no glove.pkl
    glove_dim: int = Field(300, ge=1)
    clip_max_pieces: int = Field(14, ge=1)  # BPE pieces counted per sentence (MESM: max_words_l 16 - 2)


class TrainerParams(Section):
    """How every model is trained (pipeline.training.trainer); model hyper-parameters live in `model.<name>`."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_workers: int = Field(0, ge=0)
    out_dir: str = "runs"
    # Split evaluated during training to select the kept epoch; null keeps the last epoch. The seeds
    # selected on their test split: that is possible (and logged loudly), never a silent default.
    select_split: str | None = None
    select_metric: str | None = None  # null: the model config's select_metric
    deterministic: bool = True
    amp: bool = True  # mixed precision on CUDA (ignored on CPU)
    amp_dtype: Literal["float16", "bfloat16"] = "float16"
    resume: bool = True  # resume from the last epoch checkpoint made with the same config
    keep_checkpoints: int = Field(1, ge=1)  # epoch checkpoints kept on disk (newest)


class EvaluateParams(Section):
    out_dir: str = "results"
    split: str = "test"
    random_baseline_seed: int = 0


class Params(Section):
    seed: int = 0
    synth: SynthParams = SynthParams()
    dataset: DatasetParams = DatasetParams()
    decode: DecodeParams = DecodeParams()
    features: list[str] = Field(default_factory=lambda: ["clip"])
    extractors: dict[str, dict[str, Any]] = Field(default_factory=dict)
    extract: ExtractParams = ExtractParams()
    ray: RayParams = RayParams()
    merge: MergeParams = MergeParams()
    # published feature files read in as features/<name>.h5; an imported name is never extracted
    imports: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")], ImportParams] = Field(
        default_factory=dict)
    vocab: VocabParams = VocabParams()
    models: list[str] = Field(default_factory=list)
    model: dict[str, dict[str, Any]] = Field(default_factory=dict)
    trainer: TrainerParams = TrainerParams()
    evaluate: EvaluateParams = EvaluateParams()

    def extracted_features(self) -> list[str]:
        """`features` less the imported names: the ones decode, extract and merge make."""
        return [f for f in self.features if f not in self.imports]


# -- loading --------------------------------------------------------------------------------------


def _describe(err: dict[str, Any]) -> str:
    kind, msg = err.get("type", ""), err.get("msg", "")
    if kind == "extra_forbidden":
        return "unknown key (not in the schema)"
    if kind == "missing":
        return "missing required key"
    got = err.get("input")
    got_text = "" if isinstance(got, (dict, list)) else f", got {got!r}"
    msg = msg.removeprefix("Input should be ").removeprefix("Value error, ")
    return f"expected {msg or kind}{got_text}"


def _format_errors(source: str, exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in (prefix.split(".") if prefix else []) + list(err["loc"]))
        lines.append(f"{source}: key '{key or '<root>'}': {_describe(err)}")
    return "\n".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], yaml-parsed value)."""
    if "=" not in text:
        raise ParamsError(f"override '{text}': expected KEY=VALUE (e.g. decode.workers=4)")
    key, value = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(keys):
        raise ParamsError(f"override '{text}': empty part in the key '{key}'")
    try:
        return keys, yaml.safe_load(value)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ParamsError(f"override '{text}': the value is not valid YAML ({problem})") from None


def deep_merge(base: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in overlay.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ParamsError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except yaml.YAMLError as e:
        raise ParamsError(f"{path}: not valid YAML: {e}") from None
    if data is None:  # an empty file would silently run every stage on the defaults
        raise ParamsError(f"{path}: the file is empty (expected a mapping of params)")
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level")
    return data


def load_params(
    path: str | os.PathLike = "params.yaml",
    overrides: list[str] | None = None,
    profiles: list[str | os.PathLike] | None = None,
    registries: Sequence[Registry] = (),
) -> Params:
    """Load, overlay profiles and `key=value` overrides, and validate everything before any work.

    A profile deep-merges into the params, except that a model's section in a profile replaces that
    model's section whole: a published configuration is the profile's section plus the model's own
    defaults, never with the synthetic default's values for the keys it does not spell out.
    `registries` (e.g. EXTRACTORS, MODELS) validate the names they own and their config sections."""
    source = str(path)
    data = read_yaml(path)
    for prof in profiles or []:
        overlay = read_yaml(prof)
        data = deep_merge(data, overlay)
        models = overlay.get("model")
        for name, section in (models.items() if isinstance(models, dict) else ()):
            data["model"][name] = copy.deepcopy(section)
        source += f" + {prof}"
    for ov in overrides or []:
        keys, value = parse_override(ov)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ParamsError(f"override '{ov}': '{k}' is not a mapping")
        node[keys[-1]] = value
    _reject_moved_keys(data, source)
    try:
        params = Params.model_validate(data)
    except ValidationError as e:
        raise ParamsError(_format_errors(source, e)) from None
    for registry in registries:
        _validate_registered(params, source, registry)
    return params


# Keys that moved: an old params file or profile gets the new key's name, not just "unknown key".
MOVED_KEYS = {"decode.video_dir": "dataset.video_dir"}


def _reject_moved_keys(data: dict[str, Any], source: str) -> None:
    for old, new in MOVED_KEYS.items():
        section, _, key = old.partition(".")
        if isinstance(data.get(section), dict) and key in data[section]:
            raise ParamsError(f"{source}: key '{old}': moved to '{new}' (one key for the videos "
                              f"decode reads); rename it")


def _validate_registered(params: Params, source: str, registry: Registry) -> None:
    """Names in the registry's list key (`features`, `models`) must be registered; the sections of
    its table (`extractors`, `model`) must name registered members and validate."""
    list_key, table_key = registry.list_key, registry.table_key
    if list_key is not None:
        for i, name in enumerate(getattr(params, list_key)):
            if name not in registry:
                raise ParamsError(
                    f"{source}: key '{list_key}.{i}': unknown {registry.kind} '{name}'; "
                    f"expected one of {registry.names()}"
                )
    if table_key is not None:
        for name, cfg in getattr(params, table_key).items():
            if name not in registry:
                raise ParamsError(
                    f"{source}: key '{table_key}.{name}': unknown {registry.kind} '{name}'; "
                    f"expected one of {registry.names()}"
                )
            try:
                registry.spec(name).Config.model_validate(cfg)
            except ValidationError as e:
                raise ParamsError(_format_errors(source, e, prefix=f"{table_key}.{name}")) from None


def require_files(source: str, paths: dict[str, str | None]) -> None:
    """Fail before any work if an input a command needs is missing; `paths` maps key path -> path."""
    missing = [
        f"{source}: key '{key}': input file not found: {p}"
        for key, p in paths.items()
        if p is not None and not Path(p).exists()
    ]
    if missing:
        raise ParamsError("\n".join(missing))


def subset(params: Params, *keys: str) -> dict[str, Any]:
    """The values of dotted keys, for provenance: exactly what a stage read."""
    dumped = params.model_dump()
    out: dict[str, Any] = {}
    for key in keys:
        node: Any = dumped
        for part in key.split("."):
            node = node[part]
        out[key] = node
    return out
