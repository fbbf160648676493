"""The interface every method shares.

A method owns a backbone and its heads. The engine calls, per step:
``out = method.training_step(views, indices)`` → a dict with ``loss`` (a scalar tensor with grad)
and detached loggable scalars (their per-epoch means go to the record's ``history``, under
``diagnostics``); then the optimiser step; then ``method.after_optimizer_step``.
Evaluation only ever calls ``method.embed(images)``: pooled backbone features, before any head.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn


class MethodConfigError(ValueError):
    """An unknown method, option or option value; the message lists what is valid."""


def _build_dataclass(cls: type, options: dict[str, Any], where: str) -> Any:
    valid = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise MethodConfigError(
            f"unknown option(s) {', '.join(unknown)} for {where}; valid options: "
            f"{', '.join(sorted(valid))}"
        )
    kwargs: dict[str, Any] = {}
    for key, value in options.items():
        factory = valid[key].default_factory
        nested = factory() if factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(nested) and isinstance(value, dict):
            value = _build_dataclass(type(nested), value, f"{where}.{key}")
        elif isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def check_choice(where: str, value: Any, choices: tuple[Any, ...] | list[Any]) -> None:
    """Raise MethodConfigError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise MethodConfigError(
            f"invalid {where}={value!r}; valid values: {', '.join(map(str, choices))}"
        )


def check_positive(where: str, value: float, *, allow_zero: bool = False) -> None:
    """Raise MethodConfigError unless ``value`` is a number > 0 (>= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise MethodConfigError(f"invalid {where}={value!r}; it must be a number")
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise MethodConfigError(f"invalid {where}={value!r}; it must be {bound}")


def check_matrices(
    where: str, *, same_rows: bool = True, min_rows: int = 1, min_dim: int = 1,
    **tensors: torch.Tensor,
) -> tuple[int, int]:
    """Raise ValueError unless every tensor is 2-D with one column count D >= ``min_dim`` and,
    with ``same_rows``, one row count B >= ``min_rows``; return (B, D) of the first tensor.

    The pure losses call this first: a mismatched or empty input would otherwise surface as a
    matmul shape error deep inside the loss, or as a NaN from a mean over zero rows.
    """
    shapes = ", ".join(f"{name} {tuple(t.shape)}" for name, t in tensors.items())
    if any(not isinstance(t, torch.Tensor) or t.ndim != 2 for t in tensors.values()):
        raise ValueError(f"{where}: every input must be a 2-D (rows, D) tensor, got {shapes}")
    dims = {t.shape[1] for t in tensors.values()}
    if len(dims) != 1 or min(dims) < min_dim:
        raise ValueError(
            f"{where}: inputs must share one embedding dimension D >= {min_dim}, got {shapes}"
        )
    if same_rows and len({t.shape[0] for t in tensors.values()}) != 1:
        raise ValueError(f"{where}: inputs must have the same number of rows B, got {shapes}")
    first = next(iter(tensors.values()))
    if same_rows and first.shape[0] < min_rows:
        raise ValueError(f"{where}: needs at least {min_rows} row(s) per input, got {shapes}")
    return int(first.shape[0]), int(first.shape[1])


class SSLMethod(nn.Module, abc.ABC):
    """Base class of every self-supervised method.

    Subclasses define a dataclass ``Config`` (its defaults are the method's default preset),
    ``training_step`` and, when they keep per-step state, ``after_optimizer_step``. The class
    attributes below describe the method to the engine, the grid, the report and the tests; a
    new method sets the ones that differ from these defaults and touches no other file.
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type] = dataclasses.make_dataclass("Config", [])  # a method without options

    # -- run settings of the default preset (the dataclass holds the method's options) ---------
    #: Optimiser settings of the default preset (``method.optimizer``, engine.optim).
    optimizer_defaults: ClassVar[dict[str, Any]] = {}
    #: Per-dataset values that replace the defaults on that dataset: ``{dataset: {key: value}}``,
    #: keys of ``Config`` or ``{"optimizer": {...}}``. Every key named here is ``null`` in the
    #: composed config until the run config is resolved for its dataset (``method.auto``).
    dataset_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    @classmethod
    def epoch_defaults(cls, epochs: int, options: dict[str, Any]) -> dict[str, Any]:
        """Values, in the shape of the method config (``{"optimizer": {...}}`` included), for the
        keys left ``null`` after the per-dataset values: those whose official value changes with
        the training length ``epochs`` (and the method's resolved ``options``), as GroCo's
        configs change its learning rate. A key the user set keeps the user's value."""
        return {}

    # -- what the engine, the grid and the report need to know ------------------------------
    #: False for reference rows: the engine builds the method, skips training, then evaluates.
    trains: ClassVar[bool] = True
    #: True for the reference rows (``pixels``, ``random_init``), shown apart in the report.
    is_reference: ClassVar[bool] = False
    #: True where nothing the run computes depends on the seed (``pixels``: no weights are drawn,
    #: and the evaluation's own hold-out split has a fixed seed). One run then stands for every
    #: seed: the report pairs it with each seed of a method it is compared with.
    seed_invariant: ClassVar[bool] = False
    #: The preset (``method=<preset>``) that is this method's default; ``register_method`` sets
    #: it to the method's name unless the class names another. A preset YAML of that name in
    #: configs/method/ is optional.
    default_preset: ClassVar[str] = ""
    #: Presets the method is compared against (deltas over base); they join the default grid.
    base_presets: ClassVar[tuple[str, ...]] = ()
    #: Names of the method in eval/paper_results.csv.
    paper_aliases: ClassVar[tuple[str, ...]] = ()

    # -- what tests and benchmarks use (never part of a preset) -----------------------------
    #: Options that make the method small enough for multi-process tests on two CPU cores.
    small_options: ClassVar[dict[str, Any]] = {}
    #: Options under which W processes must compute what one process computes, for a method
    #: whose official default keeps some statistic per process by design.
    world_invariant_options: ClassVar[dict[str, Any]] = {}
    #: Performance target: a training step at most this many times SimCLR's (eval.bench).
    step_time_vs_simclr: ClassVar[float] = 1.25

    @classmethod
    def make_config(cls, **options: Any) -> Any:
        """The method's Config from ``options``; unknown options and invalid values are errors.
        ``preset`` (the preset's name, in every run config) is dropped when Config has no such
        field."""
        if "preset" not in {f.name for f in dataclasses.fields(cls.Config)}:
            options.pop("preset", None)
        config = _build_dataclass(cls.Config, options, f"method {cls.name!r}")
        cls.validate_config(config)
        return config

    @classmethod
    def validate_config(cls, config: Any) -> None:
        """Raise MethodConfigError for option values the method cannot use."""

    def __init__(self, backbone: nn.Module, config: Any) -> None:
        super().__init__()
        self.backbone = backbone
        self.config = config
        self.feature_dim: int = int(backbone.num_features)

    # -- data ------------------------------------------------------------------------------
    def view_kinds(self) -> list[str]:
        """Augmentation kind of each view the method consumes (datasets.views.view_config)."""
        return ["shared", "shared"]

    def official_view_kinds(self, dataset: str) -> list[str]:
        """The view kinds of the method's published pipeline on ``dataset`` (``augment=official``;
        datasets.views.OFFICIAL_KINDS), one per view of ``view_kinds``. A trained method without
        one refuses the setting; a reference row takes no training views."""
        if not self.trains:
            return self.view_kinds()
        raise MethodConfigError(
            f"method {self.name} has no published pipeline in this harness; use augment=shared"
        )

    def augmentation_kinds(self, augment: str, dataset: str) -> list[str]:
        """The view kinds a run uses: ``view_kinds`` (``augment=shared``) or
        ``official_view_kinds`` (``augment=official``)."""
        return self.official_view_kinds(dataset) if augment == "official" else self.view_kinds()

    def check_batch(self, batch_size: int, dataset_size: int) -> None:
        """Raise MethodConfigError when the global batch or the dataset is too small."""
        if batch_size < 2:
            raise MethodConfigError(
                f"{self.name} needs a batch of at least 2 images, got batch_size={batch_size}"
            )

    # -- training --------------------------------------------------------------------------
    @abc.abstractmethod
    def training_step(
        self, views: list[torch.Tensor], indices: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Loss (with grad) and detached scalars for one batch of V views of B images."""

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Per-step state updated after the optimiser step (EMA encoders that update late)."""

    def set_train_labels(self, labels: torch.Tensor) -> None:
        """The labels (N,) of the pre-training split by image index, which the engine passes when
        every one is known, for diagnostics only (a neighbour's label accuracy); a loss must
        never read them. The default ignores them."""

    def updates_ema_in_training_step(self) -> bool:
        """True when ``training_step`` itself updates a momentum encoder (MoCo's
        ``ema_timing=before_keys``): with gradient accumulation that runs once per micro-batch."""
        return False

    def local_bn_modules(self) -> list[nn.Module]:
        """Modules whose BatchNorm stays per process under W > 1 (not converted to SyncBN)."""
        return []

    def uses_shuffle_bn(self) -> bool:
        """True when the key encoder runs under cross-process shuffle-BN (with W > 1)."""
        return False

    def parameter_groups(self) -> list[dict[str, Any]]:
        """Trainable parameters, split so the optimiser can exclude 1-D ones from LARS/decay."""
        matrices, vectors = [], []
        for param in self.parameters():
            if not param.requires_grad:
                continue
            (vectors if param.ndim <= 1 else matrices).append(param)
        return [
            {"params": matrices, "name": "weights"},
            {"params": vectors, "name": "biases_and_norms", "is_1d": True},
        ]

    # -- evaluation ------------------------------------------------------------------------
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features (B, d), before any projector; the only thing evaluation sees."""
        return self.backbone(images)


class ReferenceMethod(SSLMethod):
    """A reference row: evaluated exactly like a method, never trained (``trains = False``).

    The engine builds it, skips the training loop and evaluates ``embed``; a call of
    ``training_step`` is a mistake and says so.
    """

    trains: ClassVar[bool] = False
    is_reference: ClassVar[bool] = True

    def training_step(
        self, views: list[torch.Tensor], indices: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        raise RuntimeError(
            f"method {self.name!r} is a reference row with nothing to train (trains = False): "
            "the engine evaluates it without a training loop, so training_step must not be called"
        )
