"""Each registered method's defaults as a hydra structured config, built from the method class.

``register_method`` stores, in hydra's ConfigStore, the node ``method_defaults/<name>``: the
``method`` section of a run config holding

- ``name``, ``preset`` (the Config's ``preset`` default, else ``default``) and ``base`` (null);
- every field of the method's ``Config`` dataclass with its default (nested dataclasses nested);
- ``optimizer``: the class's ``optimizer_defaults``;
- ``auto``: the per-dataset values, ``auto[<dataset>]`` over ``auto.default``, that the run config
  resolution (engine.config) writes into the keys left ``null`` here.

A key named in the class's ``dataset_defaults`` depends on the dataset: it is ``null`` in the node
and ``auto.default`` holds its default from the dataclass (or ``optimizer_defaults``), so the
value is still written once. A preset YAML in configs/method/ extends the node and states only what
differs::

    defaults:
      - /method_defaults/simclr@_here_
      - _self_
    preset: groco_baseline
    temperature: 0.1

A method whose default preset has no YAML file gets its default preset from the node as well
(``method/<default_preset>``), so ``method=<name>`` works with the method's file alone.

Every field is typed ``Any``: hydra then refuses keys the method does not have, while values pass
through unconverted (an override ``method.x=1`` stays the integer 1, so run hashes do not depend on
a field's declared type); the method's ``validate_config`` checks the values.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from methods.base import SSLMethod

DEFAULTS_GROUP = "method_defaults"
PRESET_GROUP = "method"
# configs/method: the preset YAMLs (a default preset with a file there is read from the file).
PRESET_DIR = Path(__file__).resolve().parent.parent / "configs" / PRESET_GROUP


def _mark_per_dataset(
    node: dict[str, Any], per_dataset: dict[str, Any], default: dict[str, Any], where: str
) -> None:
    """Set every key of ``per_dataset`` to None in ``node``, copying its value into ``default``."""
    for key, value in per_dataset.items():
        if key not in node:
            raise TypeError(
                f"{where}: dataset_defaults names {key!r}, which is not an option; valid: "
                f"{', '.join(sorted(node))}"
            )
        if isinstance(value, dict) and isinstance(node[key], dict):
            _mark_per_dataset(node[key], value, default.setdefault(key, {}), f"{where}.{key}")
        elif node[key] is not None:
            default[key] = copy.deepcopy(node[key])
            node[key] = None


def method_defaults(cls: type[SSLMethod]) -> dict[str, Any]:
    """The ``method`` section the defaults node of ``cls`` composes to, as a plain dict."""
    if not dataclasses.is_dataclass(cls.Config):
        raise TypeError(f"method {cls.name!r}: its Config must be a dataclass")
    try:
        options = dataclasses.asdict(cls.Config())
    except TypeError as exc:
        raise TypeError(
            f"method {cls.name!r}: every field of its Config needs a default (the defaults are "
            f"the method's default preset): {exc}"
        ) from None
    if "default" in cls.dataset_defaults:
        raise TypeError(
            f"method {cls.name!r}: dataset_defaults names datasets only; a value for every "
            "other dataset is the Config's (or optimizer_defaults') default"
        )
    preset = options.pop("preset", "default")
    node: dict[str, Any] = {"name": cls.name, "preset": preset, "base": None, **options}
    node["optimizer"] = copy.deepcopy(cls.optimizer_defaults)
    default: dict[str, Any] = {}
    for dataset, values in cls.dataset_defaults.items():
        _mark_per_dataset(node, values, default, f"method {cls.name!r} ({dataset})")
    node["auto"] = {"default": default, **copy.deepcopy(cls.dataset_defaults)} if default else {}
    return node


def _structured(name: str, values: dict[str, Any]) -> type:
    """A dataclass with one ``Any`` field per key (nested dicts of options nested likewise)."""
    fields = []
    for key, value in values.items():
        if isinstance(value, dict) and key not in ("optimizer", "auto"):
            nested = _structured(f"{name}_{key}", value)
            fields.append((key, Any, dataclasses.field(default_factory=nested)))
        elif isinstance(value, (dict, list)):
            factory = lambda v=value: copy.deepcopy(v)  # noqa: E731
            fields.append((key, Any, dataclasses.field(default_factory=factory)))
        else:
            fields.append((key, Any, dataclasses.field(default=value)))
    return dataclasses.make_dataclass(name, fields)


def store_method_defaults(cls: type[SSLMethod]) -> None:
    """Store ``method_defaults/<name>`` (and ``method/<default_preset>`` without a YAML file)."""
    from hydra.core.config_store import ConfigStore

    node = _structured(f"{cls.__name__}Defaults", method_defaults(cls))
    store = ConfigStore.instance()
    store.store(group=DEFAULTS_GROUP, name=cls.name, node=node)
    if not (PRESET_DIR / f"{cls.default_preset}.yaml").exists():
        store.store(group=PRESET_GROUP, name=cls.default_preset, node=node)
