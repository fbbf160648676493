"""From a composed hydra config to the fully resolved run config that is hashed and recorded.

Resolution fills every ``null`` that has a dataset-dependent default:
- ``trainer.epochs`` / ``trainer.batch_size`` from the dataset's budget,
- ``backbone.name`` / ``backbone.stem`` from the dataset's default backbone and stem,
- a method's null keys from its ``auto`` table (``auto[<dataset>]`` over ``auto.default``).

Validation then builds nothing heavy but checks every name and option, so that a bad grid fails
before the first run trains: unknown method/dataset/backbone/stem, unknown method options and
invalid values, invalid optimiser settings.
"""

from __future__ import annotations

import copy
from typing import Any

from omegaconf import DictConfig, OmegaConf

import datasets
from backbones import STEMS, BackboneError, _check_name
from engine.optim import OptimizerSettings
from eval.records import NON_SEMANTIC_KEYS, drop_keys
from methods import get_method_class

METHOD_META_KEYS = ("name", "preset", "base", "optimizer", "auto")


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


def resolve_run_config(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """The resolved, validated run config (a plain dict); raises ConfigError on bad input."""
    config = to_container(cfg)
    dataset = config["dataset"]
    name = dataset.get("name")
    if name not in datasets.list_datasets():
        raise ConfigError(
            f"unknown dataset {name!r}; valid datasets: {', '.join(datasets.list_datasets())}"
        )
    trainer = config["trainer"]
    if trainer.get("epochs") is None:
        trainer["epochs"] = dataset["epochs"]
    if trainer.get("batch_size") is None:
        trainer["batch_size"] = dataset["batch_size"]
    for key in ("epochs", "batch_size"):
        value = trainer[key]
        if not isinstance(value, int) or value < 1:
            raise ConfigError(f"invalid trainer.{key}={value!r}; it must be a whole number >= 1")

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
    validate_method(method)
    config["seed"] = int(config["seed"])
    return config


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
