"""From a composed hydra config to the fully resolved run config that is hashed and recorded.

Resolution fills every ``null`` that has a dataset-dependent default:
- ``trainer.epochs`` / ``trainer.batch_size`` from the dataset's budget,
- ``backbone.name`` / ``backbone.stem`` from the dataset's default backbone and stem,
- a method's null keys from its ``auto`` table (``auto[<dataset>]`` over ``auto.default``).

Validation then builds nothing heavy but checks every name and option, so that a bad grid fails
before the first run trains: unknown keys anywhere (hydra's struct mode refuses a misspelt
override, but its own hint, ``+key=value``, appends it), unknown method/dataset/backbone/stem,
unknown method options and invalid values, invalid optimiser settings, and the trainer and eval
settings that would otherwise only fail once training is over (k-NN settings, probe backend).
"""

from __future__ import annotations

import copy
import difflib
import functools
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

import configs
import datasets
from backbones import STEMS, BackboneError, _check_name
from engine.io import check_writable_dir
from engine.optim import OptimizerSettings
from eval.records import NON_SEMANTIC_KEYS, drop_keys
from methods import get_method_class

METHOD_META_KEYS = ("name", "preset", "base", "optimizer", "auto")
CONFIG_DIR = Path(configs.__file__).resolve().parent
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
AUGMENT_FAMILIES = ("shared", "official")
# The datasets the published pipelines were written for (colour natural images); the grey glyph
# datasets keep their own recipe, which neither flips nor jitters hue.
OFFICIAL_AUGMENT_DATASETS = ("cifar10", "cifar100", "stl10", "tinyimagenet", "imagenet100",
                             "imagefolder")
PROBE_BACKENDS = ("torch", "sklearn")
KNN_KEYS = ("k", "temperature")
# Keys whose values are free-form and checked by their consumer before training starts
# (load_dataset names the dataset's options, timm.create_model the backbone's kwargs).
FREE_FORM = {("dataset", "options"), ("backbone", "kwargs")}


class ConfigError(ValueError):
    """A run config that cannot be run; the message names the key, the value and valid ones."""


def _fill_nulls(target: dict[str, Any], defaults: dict[str, Any], where: str) -> None:
    for key, value in defaults.items():
        if key not in target:
            raise ConfigError(f"{where}.auto names {key!r}, which is not a key of {where}")
        if isinstance(value, dict) and isinstance(target[key], dict):
            _fill_nulls(target[key], value, f"{where}.{key}")
        elif target[key] is None:
            target[key] = copy.deepcopy(value)


def to_container(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    if isinstance(cfg, DictConfig):
        container = OmegaConf.to_container(cfg, resolve=True)
    else:
        container = copy.deepcopy(cfg)
    container.pop("hydra", None)
    return container  # type: ignore[return-value]


@functools.lru_cache(maxsize=1)
def known_keys() -> dict[str, frozenset[str]]:
    """The keys each section may hold: those of configs/config.yaml and of every file of the
    dataset and backbone groups (the method section is checked against the method's Config)."""

    def keys(path: Path) -> dict[str, Any]:
        return OmegaConf.to_container(OmegaConf.load(path), resolve=False)  # type: ignore[return-value]

    root = keys(CONFIG_DIR / "config.yaml")
    known = {
        "": frozenset(k for k in root if k not in ("defaults", "hydra"))
        | {"method", "dataset", "backbone", "budget"},
        # engine.train.run adds trainer.world_size for W > 1 after resolution
        "trainer": frozenset(root["trainer"]) | {"world_size"},
        "eval": frozenset(root["eval"]),
    }
    for group in ("dataset", "backbone"):
        known[group] = frozenset(
            k for path in sorted((CONFIG_DIR / group).glob("*.yaml")) for k in keys(path)
        )
    return known


def _check_keys(config: dict[str, Any]) -> None:
    known = known_keys()
    for section, valid in known.items():
        node = config if section == "" else config.get(section)
        if not isinstance(node, dict):
            raise ConfigError(f"{section} must be a mapping of settings, got {node!r}")
        unknown = sorted(set(node) - valid)
        if not unknown:
            continue
        prefix = f"{section}." if section else ""
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(valid), n=1)
            hints.append(f"{prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
        raise ConfigError(
            f"unknown key(s) {', '.join(hints)}; valid keys of {section or 'the root config'}: "
            f"{', '.join(sorted(valid))}"
        )


def _whole(where: str, value: Any, minimum: int, *, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        also = " or null" if optional else ""
        raise ConfigError(f"invalid {where}={value!r}; it must be a whole number >= {minimum}{also}")


def _flag(where: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"invalid {where}={value!r}; it must be true or false")


def _choice(where: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"invalid {where}={value!r}; valid values: {', '.join(choices)}")


def _check_device(value: Any) -> None:
    # Whether the device exists is checked where the run starts (engine.distributed.pick_device),
    # and by the grid's pre-flight only for runs on this machine: a grid may be validated on a
    # login node without the GPUs its jobs will get.
    valid = "valid values: auto, cpu, cuda, cuda:<index>"
    if not isinstance(value, str) or not value:
        raise ConfigError(f"invalid trainer.device={value!r}; {valid}")
    if value == "auto":
        return
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        raise ConfigError(f"invalid trainer.device={value!r}; {valid}") from None


def _check_augment(augment: Any, dataset: str) -> None:
    _choice("augment", augment, AUGMENT_FAMILIES)
    if augment == "official" and dataset not in OFFICIAL_AUGMENT_DATASETS:
        raise ConfigError(
            f"invalid augment=official with dataset={dataset}: the published pipelines are for "
            f"colour images ({', '.join(OFFICIAL_AUGMENT_DATASETS)}); {dataset} has "
            "augment=shared only (its recipe, docs/datasets.md)"
        )


def _check_values(config: dict[str, Any]) -> None:
    """Every non-method setting that is not resolved from the dataset (those are checked there)."""
    seed = config["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"invalid seed={seed!r}; it must be a whole number")
    results_dir = config["results_dir"]
    if not isinstance(results_dir, str) or not results_dir.strip():
        # Path("") is the working directory: runs would land in ./runs without anyone asking.
        raise ConfigError(f"invalid results_dir={results_dir!r}; it must be a directory path")
    # Checked without creating anything, so that a grid is refused before its first run trains.
    check_writable_dir(results_dir)
    _flag("smoke", config.get("smoke", False))
    _check_augment(config["augment"], config["dataset"]["name"])
    trainer = config["trainer"]
    _check_device(trainer["device"])
    _choice("trainer.precision", trainer["precision"], PRECISIONS)
    if trainer["precision"] == "fp16" and str(trainer["device"]).startswith("cpu"):
        raise ConfigError(
            "invalid trainer.precision='fp16' with trainer.device='cpu'; fp16 autocast is for "
            "CUDA; valid on the CPU: auto, bf16, fp32"
        )
    _whole("trainer.num_workers", trainer["num_workers"], 0)
    _whole("trainer.max_steps_per_epoch", trainer.get("max_steps_per_epoch"), 1, optional=True)
    for key in ("progress", "resume", "skip_finished"):
        _flag(f"trainer.{key}", trainer[key])
    every = trainer["checkpoint_every_s"]
    if isinstance(every, bool) or not isinstance(every, (int, float)) or not every >= 0:
        raise ConfigError(
            f"invalid trainer.checkpoint_every_s={every!r}; it must be a number of seconds >= 0 "
            "(0: a checkpoint at the end of every epoch)"
        )
    if "world_size" in trainer:
        _whole("trainer.world_size", trainer["world_size"], 2)

    evaluation = config["eval"]
    knn = evaluation["knn"]
    if not isinstance(knn, list) or not knn:
        raise ConfigError(
            f"invalid eval.knn={knn!r}; it must be a non-empty list of {{k, temperature}} "
            "settings, the first being the headline (e.g. [{k: 20, temperature: 0.07}])"
        )
    for i, setting in enumerate(knn):
        where = f"eval.knn[{i}]"
        if not isinstance(setting, dict) or set(setting) != set(KNN_KEYS):
            raise ConfigError(
                f"invalid {where}={setting!r}; each k-NN setting has exactly the keys "
                f"{', '.join(KNN_KEYS)} (e.g. {{k: 20, temperature: 0.07}})"
            )
        _whole(f"{where}.k", setting["k"], 1)
        temperature = setting["temperature"]
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            temperature > 0
        ):
            raise ConfigError(f"invalid {where}.temperature={temperature!r}; it must be > 0")
    _flag("eval.linear", evaluation["linear"])
    _choice("eval.probe_backend", evaluation["probe_backend"], PROBE_BACKENDS)
    _whole("eval.batch_size", evaluation["batch_size"], 1)
    _whole("eval.chunk_size", evaluation["chunk_size"], 1)

    # The engine reads these with defaults (a config built as a plain dict may leave them out).
    dataset = config["dataset"]
    _flag("dataset.download", dataset.get("download", False))
    root = dataset.get("root")
    if root is not None and (not isinstance(root, str) or not root):
        raise ConfigError(f"invalid dataset.root={root!r}; it must be a path or null")
    _whole("dataset.warmup_cap_epochs", dataset.get("warmup_cap_epochs"), 0, optional=True)
    backbone = config["backbone"]
    _whole("backbone.patch_size", backbone.get("patch_size"), 1, optional=True)
    for section, key in sorted(FREE_FORM):
        value = config[section].get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"invalid {section}.{key}={value!r}; it must be a mapping")


def resolve_run_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The resolved, validated run config (a plain dict); raises ConfigError on bad input."""
    config = to_container(cfg)
    _check_keys(config)
    dataset = config["dataset"]
    name = dataset.get("name")
    if name not in datasets.list_datasets():
        raise ConfigError(
            f"unknown dataset {name!r}; valid datasets: {', '.join(datasets.list_datasets())}"
        )
    apply_budget(config)
    trainer = config["trainer"]
    if trainer.get("epochs") is None:
        trainer["epochs"] = dataset["epochs"]
    if trainer.get("batch_size") is None:
        trainer["batch_size"] = dataset["batch_size"]
    for key in ("epochs", "batch_size"):
        value = trainer[key]
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"invalid trainer.{key}={value!r}; it must be a whole number >= 1")
    _check_speed_knobs(trainer)

    backbone = config["backbone"]
    if backbone.get("name") is None:
        backbone["name"] = dataset["backbone"]
    if backbone.get("stem") is None:
        backbone["stem"] = dataset["stem"]
    if backbone["stem"] not in STEMS:
        raise ConfigError(f"invalid backbone.stem={backbone['stem']!r}; valid: {', '.join(STEMS)}")
    try:
        _check_name(backbone["name"])
    except BackboneError as exc:
        raise ConfigError(f"invalid backbone.name: {exc}") from None

    method = config["method"]
    auto = method.pop("auto", None) or {}
    defaults = copy.deepcopy(auto.get("default", {}))
    specific = auto.get(name, {})
    _merge(defaults, specific)
    _fill_nulls(method, defaults, "method")
    by_length = get_method_class(method["name"]).epoch_defaults(trainer["epochs"], method)
    _fill_nulls(method, by_length, "method")
    validate_method(method)
    _check_values(config)
    return config


# What a named budget may set for one dataset: the dataset's budget keys (configs/dataset/*.yaml,
# which hold the default budget) and the trainer's step cap.
BUDGET_DATASET_KEYS = ("epochs", "batch_size", "backbone", "stem", "warmup_cap_epochs")
BUDGET_TRAINER_KEYS = ("max_steps_per_epoch",)
DEFAULT_BUDGET = "default"


def budget_names() -> list[str]:
    """The budgets in configs/budget/ (``budget=<name>`` on the command line), sorted."""
    return sorted(p.stem for p in (CONFIG_DIR / "budget").glob("*.yaml"))


def apply_budget(config: dict[str, Any]) -> None:
    """Replace the composed ``budget`` node by its name and write its values for this dataset.

    ``default`` (or no budget node) keeps the dataset's own values and adds no key, so run hashes
    of the default budget do not depend on budgets existing. Any other budget sets the dataset's
    budget keys (``dataset.epochs``, ``batch_size``, ``backbone``, ``stem``,
    ``warmup_cap_epochs``) from its table for this dataset, fills ``trainer.max_steps_per_epoch``
    when that is null, and records ``budget: <name>``. Explicit ``trainer.*``/``backbone.*``
    overrides still win, as they do over the default budget.
    """
    node = config.pop("budget", None)
    if node is None or isinstance(node, str):  # absent, or already resolved
        if node not in (None, DEFAULT_BUDGET):
            config["budget"] = node
        return
    if not isinstance(node, dict) or not isinstance(node.get("name"), str):
        raise ConfigError(
            f"invalid budget={node!r}; choose one of {', '.join(budget_names())} (budget=<name>)"
        )
    name = node["name"]
    unknown = sorted(set(node) - {"name", "datasets"})
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join('budget.' + k for k in unknown)}; a budget holds name "
            "and datasets"
        )
    if name == DEFAULT_BUDGET:
        return
    dataset = config["dataset"]
    table = node.get("datasets") or {}
    entry = table.get(dataset["name"])
    if entry is None:
        defined = sorted(table)
        raise ConfigError(
            f"budget={name!r} is not defined for dataset={dataset['name']!r}; it is defined for "
            f"{', '.join(defined) if defined else 'no dataset'} (configs/budget/{name}.yaml); "
            f"use one of those datasets, or budget={DEFAULT_BUDGET}"
        )
    if not isinstance(entry, dict):
        raise ConfigError(f"invalid budget.datasets.{dataset['name']}={entry!r}; it must be a mapping")
    valid = BUDGET_DATASET_KEYS + BUDGET_TRAINER_KEYS
    unknown = sorted(set(entry) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(unknown)} in budget {name!r} for {dataset['name']}; "
            f"valid keys: {', '.join(valid)}"
        )
    for key in BUDGET_DATASET_KEYS:
        if key in entry:
            dataset[key] = copy.deepcopy(entry[key])
    trainer = config["trainer"]
    for key in BUDGET_TRAINER_KEYS:
        if key in entry and trainer.get(key) is None:
            trainer[key] = entry[key]
    config["budget"] = name


# Defaults of the speed knobs for configs built without configs/config.yaml (plain dicts), so that
# such a config hashes like the composed one.
SPEED_KNOB_DEFAULTS = {"channels_last": "auto", "compile": "auto", "grad_accum_steps": 1}


def _check_speed_knobs(trainer: dict[str, Any]) -> None:
    """trainer.channels_last / compile are auto|true|false; grad_accum_steps divides the batch."""
    for key, default in SPEED_KNOB_DEFAULTS.items():
        trainer.setdefault(key, default)
    for key in ("channels_last", "compile"):
        value = trainer[key]
        if value != "auto" and not isinstance(value, bool):
            raise ConfigError(f"invalid trainer.{key}={value!r}; valid values: auto, true, false")
    accum = trainer["grad_accum_steps"]
    if isinstance(accum, bool) or not isinstance(accum, int) or accum < 1:
        raise ConfigError(
            f"invalid trainer.grad_accum_steps={accum!r}; it must be a whole number >= 1"
        )
    batch = trainer["batch_size"]
    if batch % accum:
        raise ConfigError(
            f"trainer.batch_size={batch} is not divisible by trainer.grad_accum_steps={accum}; "
            f"use a batch size that is a multiple of {accum} or a grad_accum_steps that divides "
            f"{batch}"
        )


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = copy.deepcopy(value)


def method_options(method: dict[str, Any]) -> dict[str, Any]:
    """The keys of a method config that are options of the method class."""
    return {k: v for k, v in method.items() if k not in METHOD_META_KEYS or k == "preset"}


def validate_method(method: dict[str, Any]) -> None:
    cls = get_method_class(method["name"])
    cls.make_config(**method_options(method))
    OptimizerSettings.from_dict(method.get("optimizer") or {})


def semantic_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config without the keys in NON_SEMANTIC_KEYS: what the run hash is computed from."""
    return drop_keys(config, NON_SEMANTIC_KEYS)
