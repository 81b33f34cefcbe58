"""Typed run configuration: dataclasses, YAML presets and ``key=value`` overrides.

A run is described by one :class:`Config`; presets under ``hpseg/presets/*.yaml`` hold the
per-dataset values of the paper (spec §6) and any field can be overridden from the command
line as ``section.field=value`` (e.g. ``train.batch_size=16``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

import yaml

from hpseg.errors import InvalidInputError


@dataclass(frozen=True)
class Bounds:
    """The allowed range of a numeric field: ``low <= value`` (``<`` when ``low_open``) and
    ``value <= high`` (``<`` when ``high_open``); a bound of None is absent. Values must be finite."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.low is not None and (value <= self.low if self.low_open else value < self.low):
            return False
        return self.high is None or (value < self.high if self.high_open else value <= self.high)

    def describe(self, dotted: str) -> str:
        """The range as an inequality, e.g. ``0 < method.rho <= 1``."""
        if self.high is None and self.low is not None:
            return f"{dotted} {'>' if self.low_open else '>='} {_number(self.low)}"
        low = f"{_number(self.low)} {'<' if self.low_open else '<='} " if self.low is not None else ""
        high = f" {'<' if self.high_open else '<='} {_number(self.high)}" if self.high is not None else ""
        return f"{low}{dotted}{high}"


def _number(value: float) -> str:
    """A bound as written: whole numbers in full (a seed's 4294967295, not 4.29497e+09)."""
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


#: The ranges most fields use.
AT_LEAST_ONE, NON_NEGATIVE, POSITIVE = Bounds(1), Bounds(0), Bounds(0, low_open=True)
#: [0, 1) and (0, 1].
FRACTION_BELOW_ONE, FRACTION_ABOVE_ZERO = Bounds(0, 1, high_open=True), Bounds(0, 1, low_open=True)
#: Classes and extra clusters: the (classes, clusters) confusion matrices and probes must fit in memory
#: (a 2048 x 4096 int64 matrix is 64 MiB); the largest benchmarks have a few hundred classes.
MAX_CLASSES = 2048
#: Seeds: 0 .. 2**32 - 1, numpy's range; the RNG seeds derived from them (seed * 7919 + epoch, ...)
#: stay within the 64 bits torch accepts.
SEEDS = Bounds(0, 2**32 - 1)


@dataclass
class BackboneConfig:
    name: str = "dino_vits8"
    weights: str | None = None  # local file; None = official weights (cache or download)
    pretrained: bool = True  # False: random initialisation (tests, benchmarks, the demo without weights)


@dataclass
class DataConfig:
    # The allowed range of every numeric field (checked by Config.validate, where a config is built).
    RULES: ClassVar[dict[str, Bounds]] = {"crop_size": AT_LEAST_ONE, "val_size": AT_LEAST_ONE,
                                          "num_workers": NON_NEGATIVE}
    dataset: str = "cocostuff27"  # cocostuff27 | cityscapes27 | potsdam3 | folder
    root: str = ""
    prepared_dir: str | None = None  # prepared training set; default <root>/hpseg_prepared/train_<crop_size>
    crop_size: int = 224
    val_size: int = 320
    num_workers: int = 2
    skip_bad_images: bool = False  # skip (and report) unreadable images instead of stopping
    # [ref quirk] "jpeg": five-crop files as the authors' crop step wrote them (Pillow's defaults,
    # quality 75, 4:2:0, each crop at its own size, resized when read); "png": lossless, stored at crop_size.
    crop_format: Literal["jpeg", "png"] = "jpeg"
    # [ref quirk] Potsdam-3's training set: "labelled_whole" = labelled_train.txt only, each whole tile
    # resized (nearest, shorter side to crop_size) and centre-cropped (the authors'); "all_five_crops" =
    # unlabelled_train.txt + labelled_train.txt, five-cropped.
    potsdam_train: Literal["labelled_whole", "all_five_crops"] = "labelled_whole"
    # [ref quirk] "normalized": the consistency loss's photometric view is applied to the normalised
    # tensor (torchvision's float ops clip it to [0, 1]) and not normalised again (the authors');
    # "uint8": applied to the 0..255 image, then normalised.
    photometric_input: Literal["normalized", "uint8"] = "normalized"
    # Backbone feature cache (`hpseg cache`, hpseg.training.cache): None/"auto" = use
    # <prepared_dir>/feature_cache/<backbone> when it exists (it must then be valid); a path = that
    # cache (must be valid); "off" = always compute features with the backbone.
    feature_cache: str | None = None
    # Validation features computed once per run (hpseg.training.validation_cache): "auto" = in
    # device memory when they fit, else memory-mapped beside the feature cache; "memory" | "disk" |
    # "off" (the backbone runs on the validation images at every validation).
    val_feature_cache: str = "auto"  # checked by Config.validate (val_feature_cache_setting)

    def crop_rule(self) -> Literal["five", "whole"]:
        """How ``hpseg prepare`` makes the training items: whole tiles for Potsdam-3 by default, else five crops."""
        return "whole" if self.dataset == "potsdam3" and self.potsdam_train == "labelled_whole" else "five"

    def potsdam_lists(self) -> Literal["labelled", "all"]:
        """Potsdam-3's training lists (hpseg.data.build_raw_dataset)."""
        return "labelled" if self.potsdam_train == "labelled_whole" else "all"

    def prepared_path(self) -> Path:
        """Where ``hpseg prepare`` writes the training set and training reads it."""
        if self.prepared_dir:
            return Path(self.prepared_dir)
        if not self.root:
            raise InvalidInputError("data.root is not set: pass --data-root DIR (or data.prepared_dir=DIR)")
        return Path(self.root) / "hpseg_prepared" / f"train_{self.crop_size}"


@dataclass
class MethodConfig:
    RULES: ClassVar[dict[str, Bounds]] = {
        "dim": AT_LEAST_ONE, "n_classes": Bounds(1, MAX_CLASSES), "dropout": FRACTION_BELOW_ONE,
        "ema_momentum": FRACTION_BELOW_ONE, "pool_size": AT_LEAST_ONE, "renew_interval": AT_LEAST_ONE,
        "rho": FRACTION_ABOVE_ZERO, "tau": POSITIVE, "tau_base": POSITIVE, "warmup": NON_NEGATIVE,
        "alpha": NON_NEGATIVE, "sigma": POSITIVE, "chunk_size": NON_NEGATIVE,
        "extra_clusters": Bounds(0, MAX_CLASSES),
    }
    dim: int = 512  # D, segmentation feature width
    n_classes: int = 27  # K, clusters of the cluster probe and classes of the linear probe
    # Over-clustering (STEGO / PiCIE): the cluster probe (and the k-means baseline) get
    # n_classes + extra_clusters clusters, scored by Hungarian and many-to-one majority matching.
    extra_clusters: int = 0
    dropout: float = 0.1  # channel dropout on the head input
    ema_momentum: float = 0.99  # m of the EMA head
    pool_size: int = 2048
    renew_interval: int = 100  # steps between task-specific pool renewals
    # [ref quirk] "epoch": renew when the step's index within its epoch is a non-zero multiple of
    # renew_interval (the count restarts every epoch); "global": count the run's steps.
    renew_counter: Literal["epoch", "global"] = "epoch"
    rho: float = 0.02  # random fraction of the contrast set
    tau: float = 0.8
    tau_base: float = 0.07
    warmup: int = 1000  # steps with lambda = 0
    alpha: float = 0.05  # consistency loss weight
    sigma: float = 28.0  # LHP attention scale
    reweighting: bool = True
    # [ref quirk] one random (hw x N) pattern shared by the anchors of every image ("shared");
    # "independent" draws a fresh pattern for every anchor.
    contrast_draw: Literal["shared", "independent"] = "shared"
    # [ref quirk] extra channel dropout on f, s' and s^mix as used by the losses and on the pool
    # features, and S' run in training mode (dropout on its input); False uses clean features.
    similarity_dropout: bool = True
    # [ref quirk] the loss is scaled by tau / tau_base; False drops the factor.
    temperature_factor: bool = True
    chunk_size: int = 0  # anchors per chunk in the loss; 0 = choose automatically
    # How the loss computes its pair work (hpseg.method.loss.backend.LossBackend; all give the same
    # loss): "auto" = the Triton kernels on CUDA under fp16 / bf16, else the torch path.
    loss_backend: Literal["auto", "triton", "torch", "torch-dense", "torch-sparse"] = "auto"


@dataclass
class OptimConfig:
    RULES: ClassVar[dict[str, Bounds]] = {
        "head_lr": NON_NEGATIVE, "head_weight_decay": NON_NEGATIVE, "projection_lr": NON_NEGATIVE,
        "linear_lr": NON_NEGATIVE, "cluster_lr": NON_NEGATIVE, "grad_clip": POSITIVE,
    }
    head_lr: float = 5e-4
    head_weight_decay: float = 0.1
    projection_lr: float = 5e-4
    linear_lr: float = 1e-3
    cluster_lr: float = 5e-3
    grad_clip: float = 10.0


@dataclass
class TrainConfig:
    RULES: ClassVar[dict[str, Bounds]] = {
        "batch_size": AT_LEAST_ONE, "epochs": NON_NEGATIVE, "max_steps": NON_NEGATIVE, "seed": SEEDS,
        "val_interval": AT_LEAST_ONE, "val_max_images": NON_NEGATIVE, "log_interval": AT_LEAST_ONE,
        "checkpoint_interval": AT_LEAST_ONE, "label_free_crops": NON_NEGATIVE,
    }
    batch_size: int = 64  # the global batch: under torchrun split evenly over the ranks
    # Under torchrun: "global" finds each anchor's positives among all patches of the global batch
    # (the method, as one process); "local" within the rank's own batch_size / ranks images only
    # (no gathering, but an anchor sees 1/ranks of the batch HP is defined on).
    positives: Literal["global", "local"] = "global"
    epochs: int = 3
    max_steps: int = 0  # > 0 stops after this many steps (overrides epochs)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "fp16", "bf16", "none"] = "auto"  # auto = fp16 on CUDA, none on CPU
    # [ref quirk] float16 loss scaling as the reference, GradScaler(init_scale=2048,
    # growth_interval=1000); "pytorch" = PyTorch's defaults (65,536 and 2,000).
    grad_scaler: Literal["reference", "pytorch"] = "reference"
    val_interval: int = 100
    # Validation runs every val_interval steps counted within the epoch (as the reference) and at
    # the run's last step; [ref quirk] also at the last step of every epoch ("best" is chosen
    # among all of them); False validates on the interval only.
    validate_at_epoch_end: bool = True
    val_max_images: int = 0  # > 0 evaluates on the first images only during training
    # Which checkpoint `hpseg eval RUN` / `predict` use (hpseg.checkpoints.runs). [ref quirk] "best" keeps
    # the best sum of the four validation metrics (validation labels choose the model); "last" is
    # the final weights; "unsupervised" the best label-free criterion below (no label used).
    selection: Literal["best", "last", "unsupervised"] = "best"
    # The criterion of selection=unsupervised (hpseg.training.selection): the silhouette tracked the
    # validation mIoU best across checkpoints in the measurements of docs/results.md ("Label-free checkpoint selection").
    unsupervised_criterion: Literal["probe_agreement", "stability", "silhouette"] = "silhouette"
    # Training crops whose head features the label-free criteria score at every validation step
    # (logged to metrics.jsonl for any rule); 0 = none, only allowed when selection is not unsupervised.
    label_free_crops: int = 32
    log_interval: int = 10
    checkpoint_interval: int = 100  # steps between "last" checkpoints (also written at the end)
    output_dir: str = "runs"
    run_name: str = ""


@dataclass
class Config:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Config:
        config = cls()
        for section, entries in values.items():
            if not hasattr(config, section) or not isinstance(entries, dict):
                raise InvalidInputError(f"unknown config section {section!r}; expected one of {_sections()}")
            for key, value in entries.items():
                _set_field(getattr(config, section), f"{section}.{key}", key, value)
        return config.validate()

    def override(self, assignments: list[str]) -> Config:
        """Apply ``section.field=value`` strings (values parsed as YAML scalars)."""
        for assignment in assignments:
            if "=" not in assignment:
                raise InvalidInputError(f"override {assignment!r} is not of the form section.field=value")
            dotted, raw = assignment.split("=", 1)
            if dotted.count(".") != 1:
                raise InvalidInputError(f"override key {dotted!r} must be section.field, e.g. train.batch_size")
            section, key = dotted.split(".")
            if section not in _sections():
                raise InvalidInputError(f"unknown config section {section!r}; expected one of {_sections()}")
            _set_field(getattr(self, section), dotted, key, _parse_value(assignment, raw))
        return self.validate()

    def validate(self) -> Config:
        """``self`` if every field is within its section's ``RULES`` and the run has steps; else a
        ValueError naming the key, the value and the allowed range."""
        for section in _sections():
            values = getattr(self, section)
            for key, bounds in getattr(values, "RULES", {}).items():
                value = getattr(values, key)
                if not bounds.allows(value):
                    dotted = f"{section}.{key}"
                    raise InvalidInputError(f"{dotted}={value!r} is out of range: allowed {bounds.describe(dotted)}")
        val_feature_cache_setting(self.data.val_feature_cache)
        if self.train.selection == "unsupervised" and self.train.label_free_crops == 0:
            raise InvalidInputError("train.selection=unsupervised scores checkpoints on train.label_free_crops training "
                             "crops: set train.label_free_crops to 1 or more (default 32)")
        if self.train.max_steps == 0 and self.train.epochs == 0:
            raise InvalidInputError("train.epochs=0 with train.max_steps=0 gives no training step: "
                             "set train.epochs >= 1 or train.max_steps >= 1")
        return self

    @property
    def n_clusters(self) -> int:
        """Clusters of the cluster probe and of the k-means baseline: n_classes + extra_clusters."""
        return self.method.n_classes + self.method.extra_clusters

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


#: The settings of ``data.val_feature_cache`` (hpseg.training.validation_cache).
VAL_FEATURE_CACHE_SETTINGS = ("auto", "memory", "disk", "off")


def val_feature_cache_setting(value: str | None) -> str:
    """``data.val_feature_cache`` as one of :data:`VAL_FEATURE_CACHE_SETTINGS` (empty = auto; YAML
    reads ``off`` as false, so false / none / no mean off); ValueError naming the key otherwise."""
    setting = (value or "auto").strip().lower()
    if setting in ("false", "none", "no"):
        return "off"
    if setting not in VAL_FEATURE_CACHE_SETTINGS:
        raise InvalidInputError(f"data.val_feature_cache={value!r}: expected one of {', '.join(VAL_FEATURE_CACHE_SETTINGS)}")
    return setting


def _parse_value(assignment: str, raw: str) -> Any:
    """The YAML scalar of an override's value (None when empty)."""
    try:
        return yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as error:
        problem = str(getattr(error, "problem", None) or error).strip()
        raise InvalidInputError(f"override {assignment!r}: the value {raw!r} is not valid YAML ({problem})") from None


def _sections() -> list[str]:
    return [f.name for f in dataclasses.fields(Config)]


def _set_field(obj: Any, dotted: str, key: str, value: Any) -> None:
    hints = get_type_hints(type(obj))
    if key not in {f.name for f in dataclasses.fields(obj)}:  # not RULES, a class variable
        names = ", ".join(f.name for f in dataclasses.fields(obj))
        raise InvalidInputError(f"unknown config key {dotted!r}; known keys: {names}")
    setattr(obj, key, _coerce(dotted, hints[key], value))


def _coerce(dotted: str, hint: Any, value: Any) -> Any:
    origin = get_origin(hint)
    if origin is Literal:
        if value not in get_args(hint):
            raise InvalidInputError(f"{dotted}={value!r}: expected one of {list(get_args(hint))}")
        return value
    args = [a for a in get_args(hint) if a is not type(None)]
    if value is None:
        if type(None) in get_args(hint):
            return None
        raise InvalidInputError(f"{dotted} may not be empty")
    target = args[0] if args else hint
    if target is bool:
        if not isinstance(value, bool):
            raise InvalidInputError(f"{dotted}={value!r}: expected true or false")
        return value
    if target is float and isinstance(value, str):
        # YAML 1.1 reads "2e-3" (no dot) as a string; it is a float all the same.
        try:
            return float(value)
        except ValueError:
            pass
    if target is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if target is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if target is str:
        return str(value)
    raise InvalidInputError(f"{dotted}={value!r}: expected a value of type {getattr(target, '__name__', target)}")


def preset_names() -> list[str]:
    folder = resources.files("hpseg") / "presets"
    return sorted(p.name[: -len(".yaml")] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_path: str) -> Config:
    """A shipped preset by name (``cocostuff27``) or a YAML file by path."""
    path = Path(name_or_path)
    if path.suffix in {".yaml", ".yml"} or path.exists():
        if not path.is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        text = path.read_text()
    else:
        if name_or_path not in preset_names():
            raise InvalidInputError(f"unknown preset {name_or_path!r}; shipped presets: {', '.join(preset_names())}")
        text = (resources.files("hpseg") / "presets" / f"{name_or_path}.yaml").read_text()
    try:
        values = yaml.safe_load(text) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = str(getattr(error, "problem", None) or error).strip()
        raise InvalidInputError(f"config file {name_or_path} is not valid YAML{where}: {problem}") from None
    if not isinstance(values, dict):
        raise InvalidInputError(f"preset {name_or_path}: expected a mapping of sections at the top level")
    try:
        return Config.from_dict(values)
    except ValueError as error:
        raise InvalidInputError(f"config file {name_or_path}: {error}") from None
