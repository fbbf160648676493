"""``python -m eval.report > results/table.md``: every run record, aggregated over seeds.

A *cell* is a set of runs that agree on everything but the seed: protocol, dataset, method,
preset, backbone, budget and every hyperparameter (eval.records.cell_id). Cells are never merged,
so records of different protocols or budgets are never averaged together.

Per dataset (``--dataset NAME`` keeps one, e.g. for ``results/fashion_mnist/table.md``):

- **how to read this**: N_test, what one test image is worth (100/N_test points), the binomial
  standard error at the observed accuracy, and the minimum detectable effect of a typical
  comparison;
- **main table**: the reference rows (records with ``"reference": true``: ``pixels``,
  ``random_init``) first, then the methods. Each method's default preset reads ``default``; any
  other preset reads its name, and a swept variant lists the values that differ from its preset.
  Accuracies are mean ± 95% Student-t half-width, then (s …) the sample SD, over n seeds (n = 1:
  a percentile bootstrap over test images, marked †); an interval that leaves [0, 100] is
  clipped and marked ‡. Linear top-5 is left out on datasets with 10 classes or fewer. A probe
  whose λ sits at an end of its grid or that did not converge is marked in its cell and
  explained under the table. A k-NN column whose
  runs used a smaller k than asked (k > N_train) names the k used;
- **methods vs the reference rows**: "beats" a reference means the method's mean is above the
  reference's and the difference is significant after Holm's correction over that table's
  comparisons (paired t-test over matched seeds; without matched seeds a one-sample t-test against
  a single reference value, or Welch's t-test); with one matched seed, the 95% paired-bootstrap
  interval over test images lies above 0 (test-set sampling only, marked). A seed-invariant
  reference (``SSLMethod.seed_invariant``: ``pixels``) is one value whatever the seed, so one run
  of it is paired with every seed of the method;
- **gain over each method's base** on matched seeds (paired t-test, or a paired bootstrap with
  one matched seed), unmatched seeds listed;
- **ablations**: one table per swept key and per setting of every other key, holding only cells
  equal in everything else; the default value is marked and every other value is compared with
  it.

Every table of comparisons is one family: Holm-adjusted p (family-wise error) and
Benjamini–Hochberg q (false discovery rate) stand beside the raw p, and the significance mark *
uses the Holm value. Every comparison gives its power: the minimum detectable effect (MDE) at
α = 0.05 and power 0.8 from the observed paired SD and n (noncentral t), and the seeds needed to
detect the observed Δ (or "more than 20"); with one seed, the same from the paired bootstrap's
standard error over test images. Every table's header gives the provenance of its records
(commit, torch, threads, device, CPU/GPU model) and says so when they differ.

Then: local-neighbourhood consistency; paper vs reproduced (``eval/paper_results.csv``), joined
only on dataset, backbone, epochs, the method's default preset and the same metric settings, else
"no comparable run"; failed, unfinished and unreadable runs; plots (accuracy vs group size and
every other numeric swept key, k-NN accuracy vs k, training loss), all within [0, 100].

Next to the markdown, ``runs.csv`` holds one row per run (the config keys that vary, the seed,
every metric, the provenance), so a committed table can be audited without the git-ignored
records. It is written where the plots go (``--plots-dir``, default: the ``--output`` file's
directory, else ``results``), or to ``--runs-csv PATH``.

Every file the report writes goes through ``engine.io``'s atomic writer (temp file, fsync,
rename). Printing to stdout stays the default; a shell redirect into the file truncates it before
the report starts, so an interrupted ``> results/table.md`` leaves it empty where
``--output results/table.md`` leaves the old one.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval.records import (
    NON_CELL_KEYS,
    RecordSet,
    cell_id,
    drop_keys,
    flatten,
    load_records,
    unpack_bits,
)
from eval.stats import (
    ALPHA,
    BOOTSTRAP_LABEL,
    MAX_SEEDS,
    POWER,
    benjamini_hochberg,
    binomial_se,
    bootstrap_ci,
    bootstrap_mde,
    clip_interval,
    fmt_p,
    holm,
    one_image_step,
    paired_bootstrap_diffs,
    paired_comparison,
    paired_t_mde,
    seeds_needed,
    t_interval,
    t_mde,
    two_sample_comparison,
)

KEY_COLUMNS = ["dataset", "method", "preset", "backbone", "epochs", "batch_size"]
LINEAR_METRICS = [("linear_top1", "linear top-1", "linear"), ("linear_top5", "linear top-5", None)]
HEADLINE_KNN = "knn20_top1"
COMPARED_METRICS = ("knn", "linear_top1")  # the headline k-NN and the linear top-1
AGREEMENT_KS = ("1", "5", "20", "50", "200")
PAPER_CSV = Path(__file__).resolve().parent / "paper_results.csv"
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# Config keys that name a cell rather than set a hyperparameter: never an ablation axis.
IGNORED_SWEEP_KEYS = {"method.name", "method.preset", "method.base", "dataset.name"}
# Top-5 says nothing with this many classes or fewer (a probe that ranks 5 of 10 is near 100).
TOP5_MIN_CLASSES = 11
DEFAULT_COMMAND = "python -m eval.report > results/table.md"
ABSENT = "<absent>"

MARK_BOOTSTRAP = "†"
MARK_CLIPPED = "‡"
MARK_SIGNIFICANT = "*"
LEGEND = (
    f"{MARK_BOOTSTRAP} n = 1: 95% percentile {BOOTSTRAP_LABEL} (test-set sampling only, not "
    f"training variance). {MARK_CLIPPED} the 95% interval left [0, 100] and is clipped to it. "
    "`λ-edge r/n`: in r of the n runs the linear probe picked a λ at an end of its grid; "
    "`not converged r/n`: in r of the n runs the probe's solver stopped at its iteration limit "
    f"(both explained under the table). {MARK_SIGNIFICANT} Holm-adjusted p < {ALPHA} within the "
    "table (the table's comparisons are the family)."
)


@dataclass
class Report:
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    plots: dict[str, bytes] = field(default_factory=dict)
    cells: pd.DataFrame = field(default_factory=pd.DataFrame)
    records: list[dict[str, Any]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# read-only views of a record
# --------------------------------------------------------------------------------------------
PROVENANCE_FIELDS = ("commit", "torch", "threads", "device", "device model")


def record_provenance(record: dict[str, Any]) -> dict[str, str]:
    """Where a run ran: git commit, torch version, intra-op threads, device and its model."""
    packages = record.get("packages") if isinstance(record.get("packages"), dict) else {}

    def text(value: Any) -> str:
        return "not recorded" if value is None or value == "" else str(value)

    return {
        "commit": text(record.get("git_commit")),
        "torch": text(packages.get("torch")),
        "threads": text(record.get("threads")),
        "device": text(record.get("device")),
        "device model": text(record.get("device_name")),
    }


def is_reference(record: dict[str, Any]) -> bool:
    return bool(record.get("reference", False))


def n_classes(record: dict[str, Any]) -> int | None:
    """The record's class count, else the dataset's registered one (None when unknown)."""
    value = record.get("metrics", {}).get("n_classes")
    if isinstance(value, int):
        return value
    from datasets import DATASET_INFO

    return DATASET_INFO.get(record.get("dataset"), {}).get("num_classes")


def _knn_k(metric: str) -> int | None:
    match = re.fullmatch(r"knn(\d+)_top1", metric)
    return int(match.group(1)) if match else None


def knn_temperature(record: dict[str, Any], k: int) -> float | None:
    value = record.get("metrics", {}).get(f"knn{k}_temperature")
    if value is not None:
        return float(value)
    for setting in record.get("config", {}).get("eval", {}).get("knn", []) or []:
        if isinstance(setting, dict) and int(setting.get("k", -1)) == k:
            return float(setting["temperature"])
    return None


def knn_k_used(record: dict[str, Any], k: int) -> int:
    """The k a record's k-NN at setting k actually used (k itself unless the record says less)."""
    value = record.get("metrics", {}).get(f"knn{k}_k_used")
    return int(value) if value is not None else k


def _cell_config(record: dict[str, Any]) -> dict[str, Any]:
    """The flattened config that defines a cell: everything but the seed and run-time knobs."""
    return flatten(drop_keys(record.get("config", {}), NON_CELL_KEYS))


def _same(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return float(a) == float(b)
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _whole_or_none(value: Any) -> int | None:
    """A record's epoch count as an int (pandas may hold it as a float), None if absent."""
    if _is_nan(value) or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _is_nan(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# --------------------------------------------------------------------------------------------
# presets: what `default` means
# --------------------------------------------------------------------------------------------
class PresetIndex:
    """The method presets of configs/method (and any registered in hydra's ConfigStore),
    composed and resolved per dataset: each method's default preset (the class's
    ``default_preset``) and every preset's resolved config, to label a cell ``default`` and to
    mark the default value of a swept key."""

    def __init__(self, config_dir: Path = CONFIG_DIR) -> None:
        self._config_dir = str(config_dir)
        self._options: dict[tuple[str, str], str] | None = None
        self._configs: dict[tuple[str, str, str, int | None], dict[str, Any] | None] = {}

    def _compose(self, overrides: list[str]) -> Any:
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=self._config_dir, version_base="1.3"):
            return compose("config", overrides=overrides)

    def _preset_options(self) -> dict[tuple[str, str], str]:
        """(method name, preset name) → the ``method=`` option that selects it."""
        if self._options is None:
            from hydra import initialize_config_dir
            from hydra.core.global_hydra import GlobalHydra
            from omegaconf import OmegaConf

            import methods

            methods.list_methods()  # registers every method (and its structured presets)
            self._options = {}
            with initialize_config_dir(config_dir=self._config_dir, version_base="1.3"):
                loader = GlobalHydra.instance().config_loader()
                from hydra import compose

                for option in loader.get_group_options("method"):
                    try:
                        cfg = compose("config", overrides=[f"method={option}"])
                    except Exception:  # noqa: BLE001 - an uncomposable preset is just not indexed
                        continue
                    method = OmegaConf.to_container(cfg.method)
                    name, preset = method.get("name"), method.get("preset")
                    if name is not None:
                        self._options.setdefault((str(name), str(preset)), option)
        return self._options

    def default_preset(self, method: str) -> str | None:
        """The preset name (a record's ``preset``) of the method's default preset, or None for a
        method this checkout does not register."""
        import methods

        if method not in methods.list_methods():
            return None
        option = methods.get_method_class(method).default_preset
        for (name, preset), opt in self._preset_options().items():
            if name == method and opt == option:
                return preset
        return None

    def flat_config(
        self, method: str, preset: str, dataset: str, epochs: int | None = None
    ) -> dict[str, Any] | None:
        """The preset's run config resolved for ``dataset`` and ``epochs`` (a method's defaults
        may depend on the length: ``SSLMethod.epoch_defaults``), flattened (None if unknown)."""
        key = (method, preset, dataset, epochs)
        if key not in self._configs:
            self._configs[key] = self._resolve(method, preset, dataset, epochs)
        return self._configs[key]

    def _resolve(
        self, method: str, preset: str, dataset: str, epochs: int | None
    ) -> dict[str, Any] | None:
        from engine.config import resolve_run_config, to_container

        option = self._preset_options().get((method, preset))
        if option is None:
            return None
        overrides = [f"method={option}", f"dataset={dataset}"]
        if epochs is not None:
            overrides.append(f"trainer.epochs={epochs}")
        try:
            config = resolve_run_config(self._compose(overrides))
        except Exception:  # noqa: BLE001 - a dataset without a config: the unresolved preset
            try:
                config = to_container(self._compose([f"method={option}"]))
            except Exception:  # noqa: BLE001
                return None
            config = {"method": {k: v for k, v in config["method"].items() if k != "auto"}}
        return flatten(drop_keys(config, NON_CELL_KEYS))


_PRESETS: PresetIndex | None = None


def default_presets() -> PresetIndex:
    """The process-wide PresetIndex of this checkout's configs (composed once, on first use)."""
    global _PRESETS
    if _PRESETS is None:
        _PRESETS = PresetIndex()
    return _PRESETS


class StaticPresets(PresetIndex):
    """A PresetIndex from given values: ``defaults`` maps a method to its default preset's name,
    ``configs`` maps (method, preset) to a flat config (keys as in ``eval.records.flatten``)."""

    def __init__(
        self,
        defaults: dict[str, str] | None = None,
        configs: dict[tuple[str, str], dict[str, Any]] | None = None,
    ) -> None:
        super().__init__()
        self._defaults = dict(defaults or {})
        self._static = dict(configs or {})

    def default_preset(self, method: str) -> str | None:
        return self._defaults.get(method)

    def flat_config(
        self, method: str, preset: str, dataset: str, epochs: int | None = None
    ) -> dict[str, Any] | None:
        return self._static.get((method, preset))


def _variant(row: dict[str, Any], presets: PresetIndex) -> tuple[str, list[str]]:
    """(preset label, the method values that differ from that preset)."""
    if row["reference"]:
        return "reference", []
    default = presets.default_preset(row["method"])
    preset = str(row["preset"])
    if default is not None and preset == default:
        label = "default" if preset == "default" else f"default ({preset})"
    else:
        label = preset
    preset_config = presets.flat_config(
        row["method"], preset, row["dataset"], _whole_or_none(row.get("epochs"))) or {}
    diffs = []
    for key, value in sorted(row["flat_config"].items()):
        if not key.startswith("method.") or key in IGNORED_SWEEP_KEYS:
            continue
        if key.startswith("method.auto."):
            continue
        if key in preset_config:
            if preset_config[key] is None or _same(preset_config[key], value):
                continue
        elif not preset_config:
            continue
        diffs.append(f"{key}={value}")
    return label, diffs


def _is_default_cell(row: pd.Series | dict[str, Any]) -> bool:
    return str(row["preset_label"]).startswith("default") and not row["method_diffs"]


# --------------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------------
def _correct_key(metric: str) -> str | None:
    k = _knn_k(metric)
    if k is not None:
        return f"knn{k}"
    return "linear" if metric == "linear_top1" else None


def _correct(record: dict[str, Any], key: str | None) -> np.ndarray | None:
    packed = record.get("correct", {}).get(key) if key else None
    if packed is None:
        return None
    return unpack_bits(packed, int(record["metrics"]["n_test"]))


def _summary(values: list[float], correct: list[np.ndarray | None]) -> dict[str, Any]:
    """mean, sd (ddof = 1; NaN for n < 2), low, high (clipped to [0, 100]), kind (t | bootstrap |
    none), clipped, n. ``correct[i]`` is the per-image correctness of the run of ``values[i]``."""
    if len(values) >= 2:
        s = t_interval(values)
        low, high, clipped = clip_interval(s.low, s.high)
        return {"mean": s.mean, "sd": s.std, "low": low, "high": high, "kind": "t",
                "clipped": clipped, "n": s.n}
    single = {"sd": math.nan, "clipped": False, "n": len(values)}
    if values and correct and correct[0] is not None:
        _, low, high = bootstrap_ci(correct[0])
        return {"mean": values[0], "low": low, "high": high, "kind": "bootstrap", **single}
    mean = values[0] if values else math.nan
    return {"mean": mean, "low": math.nan, "high": math.nan, "kind": "none", **single}


def _summary_columns(row: dict[str, Any], metric: str, summary: dict[str, Any]) -> None:
    row[f"{metric}_mean"] = summary["mean"]
    row[f"{metric}_sd"] = summary["sd"]
    row[f"{metric}_ci_low"] = summary["low"]
    row[f"{metric}_ci_high"] = summary["high"]
    row[f"{metric}_ci_kind"] = summary["kind"]
    row[f"{metric}_ci_clipped"] = summary["clipped"]


def metric_names(records: list[dict[str, Any]]) -> list[str]:
    """The k-NN top-1 metrics in the records (by k), then linear top-1 and top-5."""
    keys = {key for r in records for key in r.get("metrics", {})}
    knn = sorted((k for k in keys if _knn_k(k) is not None), key=_knn_k)
    return knn + [m for m, _, _ in LINEAR_METRICS if m in keys]


def headline_knn(metrics: list[str]) -> str | None:
    knn = [m for m in metrics if _knn_k(m) is not None]
    if HEADLINE_KNN in knn:
        return HEADLINE_KNN
    return knn[0] if knn else None


def build_cells(records: list[dict[str, Any]], presets: PresetIndex | None = None) -> pd.DataFrame:
    """One row per cell: key columns, the runs, per-seed values, each metric's interval, the
    probe flags and the variant label (``default``, a preset name, the values that differ)."""
    presets = presets or default_presets()
    metrics = metric_names(records)
    by_cell: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_cell.setdefault(cell_id(record), []).append(record)
    rows = []
    for cell, runs in by_cell.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        first = runs[0]
        row: dict[str, Any] = {key: first.get(key) for key in KEY_COLUMNS}
        row.update(
            cell=cell,
            protocol=first.get("protocol"),
            reference=is_reference(first),
            n=len(runs),
            seeds=",".join(str(r["seed"]) for r in runs),
            train_seconds=float(np.mean([r.get("train_seconds", math.nan) for r in runs])),
            images_per_second=float(np.mean([r.get("images_per_second", math.nan) for r in runs])),
            flat_config=_cell_config(first),
            runs=runs,
            n_test=first.get("metrics", {}).get("n_test"),
            n_train=first.get("metrics", {}).get("n_train"),
            n_classes=n_classes(first),
            lambda_edge=[(r["seed"], r["metrics"].get("linear_lambda")) for r in runs
                         if r["metrics"].get("linear_lambda_at_edge")],
            unconverged=[(r["seed"], r["metrics"].get("linear_iterations")) for r in runs
                         if r["metrics"].get("linear_converged") is False],
        )
        for metric in metrics:
            having = [r for r in runs if metric in r["metrics"]]
            values = [float(r["metrics"][metric]) for r in having]
            key = _correct_key(metric)
            _summary_columns(row, metric, _summary(values, [_correct(r, key) for r in having]))
        rows.append(row)
    cells = pd.DataFrame(rows)
    if cells.empty:
        return cells
    labels = [_variant(row, presets) for row in cells.to_dict("records")]
    cells["preset_label"] = [label for label, _ in labels]
    cells["method_diffs"] = [diffs for _, diffs in labels]
    cells["setting"] = [_setting(row, cells) for _, row in cells.iterrows()]
    cells["_ref_order"] = ~cells["reference"]
    cells = cells.sort_values(["dataset", "_ref_order", *KEY_COLUMNS[1:], "setting"])
    return cells.drop(columns="_ref_order").reset_index(drop=True)


def _varying_keys(configs: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for c in configs for k in c} - {"seed"} - IGNORED_SWEEP_KEYS)
    return [k for k in keys
            if len({json.dumps(c.get(k, ABSENT), default=str) for c in configs}) > 1]


def _setting(row: pd.Series, cells: pd.DataFrame) -> str:
    """The values that differ from the cell's preset, then the non-method keys that tell it apart
    from the other cells with the same key columns; "" when there are none."""
    parts = list(row["method_diffs"])
    same = cells[(cells[KEY_COLUMNS] == row[KEY_COLUMNS]).all(axis=1)]
    if len(same) > 1:
        for key in _varying_keys(list(same["flat_config"])):
            if not key.startswith("method."):
                parts.append(f"{key}={row['flat_config'].get(key, ABSENT)}")
    return ", ".join(parts)


def fmt_interval(row: pd.Series | dict[str, Any], metric: str) -> str:
    mean = row.get(f"{metric}_mean")
    if _is_nan(mean):
        return "–"
    kind = row.get(f"{metric}_ci_kind")
    low, high = row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high")
    if kind == "t":
        sd = row.get(f"{metric}_sd")
        spread = "" if _is_nan(sd) else f" (s {sd:.2f})"
        if row.get(f"{metric}_ci_clipped"):
            return f"{mean:.2f} [{low:.2f}, {high:.2f}]{MARK_CLIPPED}{spread}"
        return f"{mean:.2f} ± {(high - mean):.2f}{spread}"
    if kind == "bootstrap":
        return f"{mean:.2f} [{low:.2f}, {high:.2f}]{MARK_BOOTSTRAP}"
    return f"{mean:.2f}"


def _flag_text(row: pd.Series | dict[str, Any]) -> str:
    marks = []
    if row.get("lambda_edge"):
        marks.append(f"λ-edge {len(row['lambda_edge'])}/{row['n']}")
    if row.get("unconverged"):
        marks.append(f"not converged {len(row['unconverged'])}/{row['n']}")
    return (" " + "; ".join(marks)) if marks else ""


# --------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------
def _values(cell: pd.Series | dict[str, Any], metric: str) -> dict[int, float]:
    return {r["seed"]: float(r["metrics"][metric]) for r in cell["runs"] if metric in r["metrics"]}


def _seed_invariant(method: str) -> bool:
    """Whether method ``method``'s runs give the same numbers for every seed
    (``SSLMethod.seed_invariant``); False for a name no longer registered."""
    from methods import get_method_class
    from methods.base import MethodConfigError

    try:
        return bool(get_method_class(method).seed_invariant)
    except MethodConfigError:
        return False


def _stand_in_seeds(
    base_cell: pd.Series | dict[str, Any], method: dict[int, float], base: dict[int, float]
) -> tuple[dict[int, float], list[int], int | None]:
    """``base`` extended to every seed of ``method`` when the base is seed-invariant, the seeds
    so filled in, and the seed of the base run that stands in for them (None: nothing filled).

    A seed-invariant reference (raw pixels) computes the same thing whatever the seed, so its
    one run is the value every seed of it would give; pairing it with each of the method's seeds
    makes the paired t-test a one-sample t-test of the method's seeds against that value,
    instead of a bootstrap over the test images of the one seed both happen to share. Runs of
    the base that disagree with each other (another CPU's rounding) are left as they are.
    """
    if not base or not _seed_invariant(str(base_cell["method"])) or len(set(base.values())) > 1:
        return base, [], None
    filled = sorted(set(method) - set(base))
    if not filled:
        return base, [], None
    # Every seed of the method, and no other: the base's own seeds are the same single value.
    source = min(base)
    return {seed: base[source] for seed in method}, filled, source


def compare_cells(
    method_cell: pd.Series | dict[str, Any],
    base_cell: pd.Series | dict[str, Any],
    metric: str,
    unpaired_fallback: bool = False,
) -> dict[str, Any]:
    """Δ = method − base on ``metric`` with its interval, p-value and power.

    Matched seeds n ≥ 2: paired t (``paired_comparison``), MDE from the SD of the per-seed
    differences, seeds needed for the observed Δ. n = 1: paired bootstrap over test images (no
    p-value); MDE and seeds needed from the bootstrap SE (test-set sampling only; the spread
    across training seeds may be smaller or larger, so the seed count is a rough guide).
    n = 0: "no matched seeds", unless ``unpaired_fallback`` and the method has ≥ 2 seeds: a
    one-sample t-test against a single base value or Welch's t-test. A seed-invariant base's run
    counts for every seed of the method (``_stand_in_seeds``; the row's note says so).
    """
    m, b = _values(method_cell, metric), _values(base_cell, metric)
    b, stand_in, stand_in_source = _stand_in_seeds(base_cell, m, b)
    paired = paired_comparison(m, b)
    row: dict[str, Any] = {
        "metric": metric, "n_matched": paired.n,
        "seeds": ",".join(str(s) for s, _ in paired.diffs),
        "per_seed": "; ".join(f"{s}: {d:+.2f}" for s, d in paired.diffs),
        "mean_diff": paired.mean_diff, "ci_low": paired.low, "ci_high": paired.high,
        "p_value": paired.p_value, "test": "paired t" if paired.n >= 2 else "",
        "sd": paired.std_diff, "mde": math.nan, "seeds_needed": None, "power_basis": "",
        "unmatched": _unmatched(paired.unmatched_method, paired.unmatched_base),
        "note": paired.note,
    }
    if paired.n >= 2:
        row["mde"] = paired_t_mde(paired.std_diff, paired.n)
        row["seeds_needed"] = seeds_needed(abs(paired.mean_diff), paired.std_diff)
        row["power_basis"] = "paired t"
    elif paired.n == 1:
        seed = paired.diffs[0][0]
        key = _correct_key(metric)
        mc = _correct(next(r for r in method_cell["runs"] if r["seed"] == seed), key)
        base_seed = stand_in_source if seed in stand_in else seed
        bc = _correct(next(r for r in base_cell["runs"] if r["seed"] == base_seed), key)
        if mc is not None and bc is not None and mc.shape == bc.shape:
            observed, diffs = paired_bootstrap_diffs(mc, bc)
            low, high = np.percentile(diffs, [2.5, 97.5])
            mde, se = bootstrap_mde(diffs)
            row.update(
                mean_diff=observed, ci_low=float(low), ci_high=float(high),
                test="paired bootstrap", mde=mde, sd=se,
                note="single matched seed: paired bootstrap over test images",
                seeds_needed=seeds_needed(abs(observed), se),
                power_basis="bootstrap SE (test images only; seeds needed is a rough guide)",
            )
    elif unpaired_fallback and len(m) >= 2 and len(b) >= 1:
        result = two_sample_comparison(list(m.values()), list(b.values()))
        row.update(
            mean_diff=result.mean_diff, ci_low=result.low, ci_high=result.high,
            p_value=result.p_value, test=result.test, sd=result.sd_method,
            mde=t_mde(result.se, result.df), power_basis=result.test, note="seeds not matched",
            seeds_needed=seeds_needed(
                abs(result.mean_diff), result.sd_method,
                sd_other=None if result.n_reference == 1 else result.sd_reference,
            ),
        )
    if stand_in:
        row["note"] += (f"; {base_cell['method']} is seed-invariant: its seed-{stand_in_source} "
                        f"run stands for seed{'s' if len(stand_in) > 1 else ''} "
                        f"{','.join(map(str, stand_in))}")
    return row


def _unmatched(method_only: list[int], base_only: list[int]) -> str:
    parts = []
    if method_only:
        parts.append("method only: " + ",".join(map(str, method_only)))
    if base_only:
        parts.append("base only: " + ",".join(map(str, base_only)))
    return "; ".join(parts)


def adjust_family(frame: pd.DataFrame, family: str) -> pd.DataFrame:
    """Holm p and BH q over the rows' p-values (one family); the significance mark uses Holm."""
    frame = frame.copy()
    p = frame["p_value"].astype(float).to_numpy() if "p_value" in frame else np.array([])
    frame["p_holm"] = holm(p) if len(p) else []
    frame["q_bh"] = benjamini_hochberg(p) if len(p) else []
    frame["significant"] = frame["p_holm"].astype(float) < ALPHA
    frame["family"] = family
    frame["family_size"] = int(np.isfinite(p).sum()) if len(p) else 0
    return frame


def _metric_list(cells: pd.DataFrame) -> list[str]:
    """The compared metrics: the headline k-NN and the linear top-1, where they exist."""
    present = [m for m in metric_names([r for runs in cells["runs"] for r in runs])]
    out = []
    knn = headline_knn(present)
    if knn:
        out.append(knn)
    if "linear_top1" in present:
        out.append("linear_top1")
    return out


def _key_fields(cell: pd.Series | dict[str, Any]) -> dict[str, Any]:
    return {k: cell[k] for k in [*KEY_COLUMNS, "preset_label", "setting"]}


def _base_of(cell: pd.Series) -> tuple[str, str] | None:
    base = cell["flat_config"].get("method.base")
    if not base:
        return None
    name, _, preset = str(base).partition("/")
    return name, preset


def _context(flat: dict[str, Any]) -> str:
    """Everything but the method subtree and the seed: what must match between method and base."""
    return json.dumps(
        {k: v for k, v in flat.items() if not k.startswith("method.") and k != "seed"},
        sort_keys=True, default=str,
    )


def deltas_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Each method cell against its base cell(s) under the same data/budget/backbone/eval; one
    family of comparisons per dataset."""
    frames = []
    for dataset, group in cells.groupby("dataset", sort=True):
        rows = []
        metrics = _metric_list(group)
        for _, cell in group.iterrows():
            base = _base_of(cell)
            if base is None or cell["reference"]:
                continue
            context = _context(cell["flat_config"])
            candidates = group[
                (group["method"] == base[0]) & (group["preset"] == base[1])
                & (group["protocol"] == cell["protocol"])
            ]
            candidates = [b for _, b in candidates.iterrows()
                          if _context(b["flat_config"]) == context]
            common = {**_key_fields(cell), "base": f"{base[0]}/{base[1]}", "cell": cell["cell"]}
            if not candidates:
                rows.append({**common, "metric": "all", "n_matched": 0, "p_value": math.nan,
                             "note": "base not run under the same data, budget and evaluation"})
                continue
            for base_cell in candidates:
                for metric in metrics:
                    rows.append({**common, "base_cell": base_cell["cell"],
                                 **compare_cells(cell, base_cell, metric)})
        if rows:
            frames.append(adjust_family(pd.DataFrame(rows), f"{dataset}: gain over base"))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


# What a reference row must share with a method cell to be its reference: the data as loaded,
# the evaluation and the backbone (the features' source). Training keys do not matter: a
# reference never trains.
REFERENCE_MATCH_KEYS = ("dataset.name", "dataset.options.", "eval.", "backbone.")


def _reference_matches(cell: pd.Series, ref: pd.Series) -> bool:
    """Same dataset, protocol and :data:`REFERENCE_MATCH_KEYS` values."""
    if ref["dataset"] != cell["dataset"] or ref["protocol"] != cell["protocol"]:
        return False
    keys = {k for k in [*cell["flat_config"], *ref["flat_config"]]
            if k.startswith(REFERENCE_MATCH_KEYS)}
    return all(_same(cell["flat_config"].get(k, ABSENT), ref["flat_config"].get(k, ABSENT))
               for k in keys)


def references_table(cells: pd.DataFrame) -> pd.DataFrame:
    """Every method cell against every comparable reference cell, headline k-NN and linear top-1;
    one family per dataset. ``verdict``: "beats" (Δ > 0, Holm p < α; with one matched seed the
    bootstrap interval above 0), "below" (Δ ≤ 0), "not resolved" otherwise."""
    frames = []
    for dataset, group in cells.groupby("dataset", sort=True):
        refs = group[group["reference"]]
        if refs.empty:
            continue
        metrics = _metric_list(group)
        rows = []
        for _, cell in group[~group["reference"]].iterrows():
            for _, ref in refs.iterrows():
                if not _reference_matches(cell, ref):
                    continue
                for metric in metrics:
                    rows.append({
                        **_key_fields(cell), "cell": cell["cell"], "reference": ref["method"],
                        "reference_cell": ref["cell"],
                        **compare_cells(cell, ref, metric, unpaired_fallback=True),
                    })
        if not rows:
            continue
        frame = adjust_family(pd.DataFrame(rows), f"{dataset}: methods vs references")
        frame["verdict"] = [_verdict(r) for r in frame.to_dict("records")]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def _verdict(row: dict[str, Any]) -> str:
    if _is_nan(row.get("mean_diff")):
        return "no comparison"
    if row["mean_diff"] <= 0:
        return "below"
    if row.get("test") == "paired bootstrap":
        return "beats (n = 1)" if row["ci_low"] > 0 else "not resolved"
    return "beats" if row.get("significant") else "not resolved"


def beats_summary(cell: pd.Series, references: pd.DataFrame, metric: str,
                  reference_methods: list[str] | None = None) -> str:
    """yes / no (the references it does not beat) / not resolved: does the method beat every
    reference row of its dataset? A reference with no comparable cell is named ("x not
    comparable")."""
    if references is None or references.empty:
        return "–"
    rows = references[(references["cell"] == cell["cell"]) & (references["metric"] == metric)]
    if rows.empty:
        return "–"
    verdicts = {r["reference"]: r["verdict"] for _, r in rows.iterrows()}
    missing = sorted(set(reference_methods or []) - set(verdicts))
    suffix = f" ({', '.join(missing)} not comparable)" if missing else ""
    if all(v.startswith("beats") for v in verdicts.values()):
        return "yes" + (" (n = 1)" if any("n = 1" in v for v in verdicts.values()) else "") + suffix
    if any(v == "below" for v in verdicts.values()):
        return ("no (" + ", ".join(k for k, v in sorted(verdicts.items()) if v == "below") + ")"
                + suffix)
    return "not resolved" + suffix


# --------------------------------------------------------------------------------------------
# ablations
# --------------------------------------------------------------------------------------------
def ablation_groups(cells: pd.DataFrame) -> list[dict[str, Any]]:
    """Sets of cells equal in every config key but one (and the seed): one per swept key and per
    setting of all the other keys. Each: key, the cells (sorted by value), and ``context``, the
    values of the method's other swept keys in this setting."""
    methods_cells = cells[~cells["reference"]]
    buckets: dict[tuple[str, str], list[int]] = {}
    configs = {i: {k: json.dumps(v, sort_keys=True, default=str)
                   for k, v in row["flat_config"].items() if k not in IGNORED_SWEEP_KEYS}
               for i, row in methods_cells.iterrows()}
    for i, row in methods_cells.iterrows():
        config = configs[i]
        identity = [row["protocol"], row["dataset"], row["method"], row["preset"]]
        for key in config:
            rest = {k: v for k, v in config.items() if k != key}
            signature = json.dumps([identity, rest], sort_keys=True)
            buckets.setdefault((key, signature), []).append(i)
    groups = []
    for (key, _), members in buckets.items():
        if len(members) < 2:
            continue
        group = methods_cells.loc[members]
        values = [row["flat_config"].get(key) for _, row in group.iterrows()]
        if len({json.dumps(v, default=str) for v in values}) < 2:
            continue
        first = group.iloc[0]
        family = methods_cells[
            (methods_cells["dataset"] == first["dataset"])
            & (methods_cells["method"] == first["method"])
            & (methods_cells["preset"] == first["preset"])
        ]
        others = [k for k in _varying_keys(list(family["flat_config"])) if k != key]
        context = {k: first["flat_config"].get(k, ABSENT) for k in others}
        order = sorted(group.index, key=lambda i: _value_order(methods_cells.loc[i, "flat_config"].get(key)))
        groups.append({"key": key, "cells": methods_cells.loc[order], "context": context})
    return sorted(groups, key=lambda g: (g["key"], str(g["cells"].iloc[0]["dataset"]),
                                         str(g["cells"].iloc[0]["method"]),
                                         json.dumps(g["context"], default=str)))


def _value_order(value: Any) -> tuple[int, Any]:
    return (0, float(value)) if _is_number(value) else (1, str(value))


def _context_text(context: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in context.items())


def ablation_tables(
    cells: pd.DataFrame, presets: PresetIndex | None = None
) -> dict[str, pd.DataFrame]:
    """``ablation:<key>`` (one row per cell, ``context`` naming its table) and
    ``ablation_vs_default:<key>`` (each value against the default value's cell, one family per
    table)."""
    presets = presets or default_presets()
    rows: dict[str, list[dict[str, Any]]] = {}
    comparisons: dict[str, list[pd.DataFrame]] = {}
    metrics_all = metric_names([r for runs in cells["runs"] for r in runs]) if not cells.empty else []
    for group in ablation_groups(cells):
        key, members, context = group["key"], group["cells"], group["context"]
        first = members.iloc[0]
        default_value, default_label = _default_value(first, key, presets)
        context_text = _context_text(context)
        default_cell = None
        for _, cell in members.iterrows():
            value = cell["flat_config"].get(key)
            is_default = default_value is not None and _same(value, default_value)
            if is_default:
                default_cell = cell
            row = {k: cell[k] for k in KEY_COLUMNS}
            row.update(
                cell=cell["cell"], context=context_text, key=key, value=value,
                is_default=is_default, default_label=default_label if is_default else "",
                n=cell["n"], seeds=cell["seeds"], n_classes=cell["n_classes"],
                lambda_edge=cell["lambda_edge"], unconverged=cell["unconverged"],
            )
            for metric in metrics_all:
                for suffix in ("mean", "ci_low", "ci_high", "ci_kind", "ci_clipped"):
                    row[f"{metric}_{suffix}"] = cell.get(f"{metric}_{suffix}")
            rows.setdefault(key, []).append(row)
        if default_cell is None:
            continue
        compared = []
        for _, cell in members.iterrows():
            if cell["cell"] == default_cell["cell"]:
                continue
            for metric in _metric_list(members):
                compared.append({
                    **{k: cell[k] for k in KEY_COLUMNS}, "context": context_text, "key": key,
                    "value": cell["flat_config"].get(key), "default": default_value,
                    "cell": cell["cell"], "base_cell": default_cell["cell"],
                    **compare_cells(cell, default_cell, metric),
                })
        if compared:
            family = (f"{first['dataset']}: ablation {key} of {first['method']}/{first['preset']}"
                      + (f" at {context_text}" if context_text else ""))
            comparisons.setdefault(key, []).append(adjust_family(pd.DataFrame(compared), family))
    out = {}
    for key, key_rows in rows.items():
        out[f"ablation:{key}"] = pd.DataFrame(key_rows)
        if key in comparisons:
            out[f"ablation_vs_default:{key}"] = pd.concat(comparisons[key], ignore_index=True)
    return out


def _default_value(cell: pd.Series, key: str, presets: PresetIndex) -> tuple[Any, str]:
    """The key's value in the cell's preset (resolved for its dataset) and how to name it:
    "default" when that preset is the method's default preset, else "preset <name>"."""
    config = presets.flat_config(
        cell["method"], str(cell["preset"]), cell["dataset"], _whole_or_none(cell.get("epochs"))
    ) or {}
    value = config.get(key)
    if value is None:
        return None, ""
    label = ("default" if presets.default_preset(cell["method"]) == str(cell["preset"])
             else f"preset {cell['preset']}")
    return value, label


# --------------------------------------------------------------------------------------------
# per dataset: the noise floor
# --------------------------------------------------------------------------------------------
def noise_table(cells: pd.DataFrame, deltas: pd.DataFrame | None) -> pd.DataFrame:
    """Per dataset: N_test, N_train, classes, the one-image step, the binomial SE at the mean
    headline accuracy of the method cells, and the median MDE of its method-vs-base comparisons."""
    rows = []
    for dataset, group in cells.groupby("dataset", sort=True):
        n_test = group["n_test"].dropna()
        if n_test.empty:
            continue
        n_test_value = int(n_test.iloc[0])
        metric = headline_knn(metric_names([r for runs in group["runs"] for r in runs]))
        methods_only = group[~group["reference"]]
        pool = methods_only if not methods_only.empty else group
        means = pool[f"{metric}_mean"].dropna() if metric else pd.Series(dtype=float)
        accuracy = float(means.mean()) if not means.empty else math.nan
        row = {
            "dataset": dataset, "n_test": n_test_value,
            "n_test_varies": n_test.nunique() > 1,
            "n_train": group["n_train"].dropna().iloc[0] if group["n_train"].notna().any() else None,
            "n_classes": group["n_classes"].iloc[0], "metric": metric,
            "one_image": one_image_step(n_test_value), "accuracy": accuracy,
            "accuracy_min": float(means.min()) if not means.empty else math.nan,
            "accuracy_max": float(means.max()) if not means.empty else math.nan,
            "binomial_se": binomial_se(accuracy, n_test_value) if not math.isnan(accuracy) else math.nan,
        }
        for name in ("knn", "linear"):
            row[f"typical_mde_{name}"] = math.nan
            row[f"comparisons_{name}"] = 0
        if deltas is not None and not deltas.empty and "mde" in deltas:
            mine = deltas[(deltas["dataset"] == dataset) & (deltas["n_matched"] >= 2)]
            for name, m in (("knn", metric), ("linear", "linear_top1")):
                mdes = mine[mine["metric"] == m]["mde"].astype(float).dropna()
                if not mdes.empty:
                    row[f"typical_mde_{name}"] = float(mdes.median())
                    row[f"comparisons_{name}"] = int(len(mdes))
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------
# paper vs reproduced
# --------------------------------------------------------------------------------------------
_PAPER_NAME = re.compile(r"^\s*(?P<base>[^(]+?)\s*(?:\((?P<variant>[^)]*)\))?\s*$")
# Protocols that never give our metric, whatever the numbers: the table explains each.
_NOT_OUR_METRIC = (
    ("max over epochs", "the paper takes the maximum over epochs; we report the final checkpoint"),
    ("best over", "the paper takes the best value over the run; we report the final checkpoint"),
    ("online", "the paper's probe is trained online on augmented views; ours is offline"),
    ("instance-head", "the paper's k-NN uses projection-head features; ours the pooled backbone"),
)


def paper_aliases() -> dict[str, str]:
    """Each paper method name (lower case) → our method, from the classes' ``paper_aliases``."""
    import methods

    out = {}
    for name in methods.list_methods():
        for alias in methods.get_method_class(name).paper_aliases:
            out[alias.lower()] = name
    return out


def _paper_knn_setting(protocol: str) -> tuple[int | None, float | None]:
    k = re.search(r"\bk\s*=\s*(\d+)", protocol)
    t = re.search(r"\bT\s*=\s*([0-9]*\.?[0-9]+)", protocol)
    return (int(k.group(1)) if k else None), (float(t.group(1)) if t else None)


def paper_match(paper_row: dict[str, Any], cells: pd.DataFrame, aliases: dict[str, str]
                ) -> tuple[str | None, pd.Series | None, str]:
    """(our metric, the comparable cell, why not) for one row of paper_results.csv.

    A cell is comparable only when it is of the same dataset, backbone and epochs, runs the
    method's default preset unchanged (a paper row that names a variant in parentheses has none),
    and its metric has the same settings: k-NN with the same k (the k actually used) and T; a
    linear probe of the same protocol (ours: L2-regularised logistic regression fitted to
    convergence, λ on a train hold-out; a paper's L-BFGS logistic regression is that estimator).
    """
    parsed = _PAPER_NAME.match(str(paper_row["method"]))
    base = parsed.group("base").lower() if parsed else str(paper_row["method"]).lower()
    variant = parsed.group("variant") if parsed else None
    ours = aliases.get(base)
    protocol = str(paper_row["protocol"])
    if ours is None:
        return None, None, "not one of our methods"
    candidates = cells[(cells["method"] == ours) & ~cells["reference"]]
    candidates = candidates[candidates["dataset"] == paper_row["dataset"]]
    if candidates.empty:
        return None, None, f"{ours} not run on {paper_row['dataset']}"
    candidates = candidates[candidates["backbone"] == paper_row["backbone"]]
    if candidates.empty:
        return None, None, f"{ours} not run with {paper_row['backbone']}"
    if _is_nan(paper_row.get("epochs")) or pd.isna(paper_row.get("epochs")):
        return None, None, "the paper row states no epoch count"
    candidates = candidates[candidates["epochs"] == int(paper_row["epochs"])]
    if candidates.empty:
        return None, None, f"no run of {int(paper_row['epochs'])} epochs"
    if variant:
        return None, None, f"the paper's variant ({variant}) is not a preset here"
    candidates = candidates[[_is_default_cell(r) for _, r in candidates.iterrows()]]
    if candidates.empty:
        return None, None, f"{ours}'s default preset not run unchanged"
    lowered = protocol.lower()
    for needle, reason in _NOT_OUR_METRIC:
        if needle in lowered:
            return None, None, reason
    if paper_row["metric"] == "knn_top1":
        k, temperature = _paper_knn_setting(protocol)
        if k is None or temperature is None:
            return None, None, "the paper's k-NN k or T is not stated"
        metric = f"knn{k}_top1"
        for _, cell in candidates.iterrows():
            runs = [r for r in cell["runs"] if metric in r["metrics"]]
            if not runs:
                continue
            ours_t = {knn_temperature(r, k) for r in runs}
            ours_k = {knn_k_used(r, k) for r in runs}
            if ours_k != {k}:
                return None, None, f"our k-NN used k = {sorted(ours_k)}, the paper k = {k}"
            if ours_t != {temperature}:
                return None, None, f"the paper's T = {temperature:g}, ours T = {sorted(ours_t)}"
            return metric, cell, ""
        return None, None, f"no k-NN with k = {k} in our runs"
    if paper_row["metric"] == "linear_top1":
        if "l-bfgs" in lowered:
            return "linear_top1", candidates.iloc[0], ""
        return None, None, "the paper's linear protocol is not our logistic-regression probe"
    return None, None, f"metric {paper_row['metric']} is not reported here"


def paper_table(cells: pd.DataFrame, paper_csv: Path = PAPER_CSV) -> pd.DataFrame:
    """Published numbers of the methods and datasets run here; ``ours`` only for a comparable
    cell (:func:`paper_match`), else "no comparable run" and why."""
    if not paper_csv.exists() or cells.empty:
        return pd.DataFrame()
    paper = pd.read_csv(paper_csv, dtype={"epochs": "Int64", "batch_size": "Int64"})
    aliases = paper_aliases()
    ran = set(cells.loc[~cells["reference"], "method"])
    datasets = set(cells["dataset"])
    rows = []
    for p in paper.to_dict("records"):
        parsed = _PAPER_NAME.match(str(p["method"]))
        base = parsed.group("base").lower() if parsed else ""
        if aliases.get(base) not in ran or p["dataset"] not in datasets:
            continue
        metric, cell, why = paper_match(p, cells, aliases)
        row = {
            "paper method": p["method"], "method": aliases.get(base), "dataset": p["dataset"],
            "backbone": p["backbone"], "paper epochs": p["epochs"], "metric": p["metric"],
            "paper": float(p["value"]), "paper protocol": p["protocol"], "source": p["source"],
            "verified": p["verified"],
        }
        if cell is None:
            row.update(ours="no comparable run", why=why, difference=math.nan, our_protocol="",
                       cell=None)
        else:
            row.update(
                ours=fmt_interval(cell, metric), why="", cell=cell["cell"],
                difference=float(cell[f"{metric}_mean"]) - float(p["value"]),
                our_protocol=f"{cell['protocol']} ({_our_protocol(metric, cell)}; "
                             f"{cell['epochs']} ep)",
            )
        rows.append(row)
    return pd.DataFrame(rows)


def _our_protocol(metric: str, cell: pd.Series) -> str:
    k = _knn_k(metric)
    if k is not None:
        temperatures = {knn_temperature(r, k) for r in cell["runs"]}
        return f"k-NN k={k} T={'/'.join(f'{t:g}' for t in sorted(t for t in temperatures if t))}"
    return "logistic-regression probe, λ on train hold-out"


def paper_counts(cells: pd.DataFrame, paper_csv: Path = PAPER_CSV) -> dict[str, int]:
    """How many published rows of the methods run here are on datasets not run here."""
    if not paper_csv.exists() or cells.empty:
        return {}
    paper = pd.read_csv(paper_csv)
    aliases = paper_aliases()
    ran = set(cells.loc[~cells["reference"], "method"])
    counts: Counter[str] = Counter()
    for p in paper.to_dict("records"):
        parsed = _PAPER_NAME.match(str(p["method"]))
        base = parsed.group("base").lower() if parsed else ""
        if aliases.get(base) in ran and p["dataset"] not in set(cells["dataset"]):
            counts[str(p["dataset"])] += 1
    return dict(sorted(counts.items()))


def problems_table(record_set: RecordSet) -> pd.DataFrame:
    return pd.DataFrame(
        [{"status": p.status, "run": p.run_dir, "detail": p.detail} for p in record_set.problems],
        columns=["status", "run", "detail"],
    )


def agreement_table(cells: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, cell in cells.iterrows():
        row = {key: cell[key] for key in [*KEY_COLUMNS, "preset_label", "setting", "n", "cell"]}
        for k in AGREEMENT_KS:
            values = [r["metrics"].get("neighbour_agreement", {}).get(k) for r in cell["runs"]]
            values = [float(v) for v in values if v is not None]
            _summary_columns(row, f"agree_k{k}", _summary(values, []))
        rows.append(row)
    return pd.DataFrame(rows)


def main_table(cells: pd.DataFrame, references: pd.DataFrame | None = None) -> pd.DataFrame:
    metrics = metric_names([r for runs in cells["runs"] for r in runs])
    columns = [*KEY_COLUMNS, "cell", "reference", "preset_label", "setting", "protocol", "n",
               "seeds", "n_classes", "n_test"]
    for metric in metrics:
        columns += [f"{metric}_{s}"
                    for s in ("mean", "sd", "ci_low", "ci_high", "ci_kind", "ci_clipped")]
    columns += ["lambda_edge", "unconverged", "train_seconds", "images_per_second"]
    table = cells[columns].copy()
    knn = headline_knn(metrics)
    ref_methods = {d: sorted(set(g.loc[g["reference"], "method"]))
                   for d, g in cells.groupby("dataset")}
    for name, metric in (("knn", knn), ("linear", "linear_top1")):
        table[f"beats_references_{name}"] = [
            "–" if row["reference"] or metric is None
            else beats_summary(row, references, metric, ref_methods.get(row["dataset"]))
            for _, row in cells.iterrows()
        ]
    return table


# --------------------------------------------------------------------------------------------
# runs.csv
# --------------------------------------------------------------------------------------------
def runs_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per run: identity, the config keys that vary between the runs, the seed, every
    metric (nested ones flattened, e.g. ``knn_curve.20``), the last epoch's training loss and
    method diagnostics (``final_loss``, ``diagnostics.<name>``) and the provenance."""
    configs = [_cell_config(r) for r in records]
    varying = _varying_keys(configs) if len(configs) > 1 else []
    rows = []
    for record, config in zip(records, configs, strict=True):
        row: dict[str, Any] = {
            "run_id": record.get("run_id") or Path(str(record.get("run_dir", ""))).name,
            "dataset": record.get("dataset"), "method": record.get("method"),
            "preset": record.get("preset"), "reference": is_reference(record),
            "backbone": record.get("backbone"), "epochs": record.get("epochs"),
            "batch_size": record.get("batch_size"), "seed": record.get("seed"),
            "cell": cell_id(record), "protocol": record.get("protocol"),
        }
        for key in varying:
            row[f"config.{key}"] = config.get(key, "")
        for key, value in flatten(record.get("metrics", {})).items():
            row[f"metrics.{key}"] = value
        history = record.get("history") or []
        if history:
            row["final_loss"] = history[-1].get("loss")
            for key, value in (history[-1].get("diagnostics") or {}).items():
                row[f"diagnostics.{key}"] = value
        for key, value in record_provenance(record).items():
            row[key.replace(" ", "_")] = value
        for key in ("train_seconds", "eval_seconds", "images_per_second", "finished_at"):
            row[key] = record.get(key)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    return frame.sort_values(["dataset", "method", "preset", "cell", "seed"]).reset_index(drop=True)


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def _percent_axis(ax, lows: list[float], highs: list[float]) -> None:
    """Accuracy axes stay within [0, 100]."""
    finite_low = [v for v in lows if not math.isnan(v)]
    finite_high = [v for v in highs if not math.isnan(v)]
    if not finite_low or not finite_high:
        ax.set_ylim(0, 100)
        return
    low, high = min(finite_low), max(finite_high)
    pad = max(0.5, 0.05 * (high - low))
    ax.set_ylim(max(0.0, low - pad), min(100.0, high + pad))


def _plot_name(key: str) -> str:
    return "accuracy_vs_group_size.png" if key == "method.topk_neg" else f"ablation_{key.replace('.', '_')}.png"


def ablation_plots(ablations: dict[str, pd.DataFrame], metric: str = HEADLINE_KNN) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    for key, table in ablations.items():
        if f"{metric}_mean" not in table:
            continue
        numeric = table[table["value"].map(_is_number)]
        if numeric.empty or numeric["value"].nunique() < 2:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        lows, highs = [], []
        groups = numeric.groupby(["dataset", "method", "preset", "context"])
        several_datasets = numeric["dataset"].nunique() > 1
        for index, (label, series) in enumerate(groups):
            series = series.sort_values("value")
            x = series["value"].astype(float)
            if key == "method.topk_neg":
                x = x + 1  # group size n = one positive + k negatives
            mean = series[f"{metric}_mean"].astype(float)
            low = series[f"{metric}_ci_low"].astype(float).fillna(mean).clip(0, 100)
            high = series[f"{metric}_ci_high"].astype(float).fillna(mean).clip(0, 100)
            err = np.vstack([mean - low, high - mean])
            lows += low.tolist()
            highs += high.tolist()
            name = curve_label(*label, with_dataset=several_datasets)
            ax.errorbar(x, mean, yerr=err, capsize=3, label=name, **curve_style(index))
            defaults = series[series["is_default"].astype(bool)]
            if not defaults.empty:
                dx = defaults["value"].astype(float) + (1 if key == "method.topk_neg" else 0)
                ax.scatter(dx, defaults[f"{metric}_mean"], marker="*", s=120, zorder=5,
                           color="black")
        ax.set_xlabel("group size n = 1 + k" if key == "method.topk_neg" else key)
        ax.set_ylabel(f"{_short_metric(metric)} top-1 (%)")
        if key == "method.topk_neg":
            from matplotlib.ticker import NullFormatter, ScalarFormatter

            ax.set_xscale("log")
            ax.set_xticks(sorted(set(numeric["value"].astype(float) + 1)))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
        _percent_axis(ax, lows, highs)
        ax.legend(fontsize=7, title="★ default", title_fontsize=7)
        ax.grid(alpha=0.3)
        plots[_plot_name(key)] = _png(fig)
        plt.close(fig)
    return plots


CURVE_MARKERS = ("o", "s", "^", "D", "v", "P")


def curve_style(index: int) -> dict[str, str]:
    """Colour and marker of the ``index``-th curve of a plot: matplotlib's ten cycle colours, then
    the same colours with the next marker, so up to 60 curves never share both (past ten, the
    default cycle alone gave two curves one colour and one marker)."""
    return {"color": f"C{index % 10}",
            "marker": CURVE_MARKERS[(index // 10) % len(CURVE_MARKERS)]}


def curve_label(dataset: str, method: str, preset: str, setting: str, *,
                with_dataset: bool) -> str:
    """A curve's legend entry: ``method/preset`` and its setting, after the dataset only where the
    plot holds several (in a one-dataset report the name would only lengthen every entry)."""
    label = f"{method}/{preset}" + (f" {setting}" if setting else "")
    return f"{dataset} {label}" if with_dataset else label


def knn_curve_plot(cells: pd.DataFrame) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    curves_drawn = 0
    lows, highs = [], []
    several_datasets = cells["dataset"].nunique() > 1
    for _, cell in cells.iterrows():
        curves = [r["metrics"].get("knn_curve") for r in cell["runs"]]
        curves = [c for c in curves if c]
        if not curves:
            continue
        ks = sorted({int(k) for c in curves for k in c})
        mean, low, high = [], [], []
        for k in ks:
            s = t_interval([c[str(k)] for c in curves if str(k) in c])
            lo, hi, _ = clip_interval(s.low, s.high)
            mean.append(s.mean)
            low.append(s.mean if math.isnan(lo) else lo)
            high.append(s.mean if math.isnan(hi) else hi)
        lows += low
        highs += high
        label = curve_label(cell["dataset"], cell["method"], cell["preset"], cell["setting"],
                            with_dataset=several_datasets)
        err = np.vstack([np.subtract(mean, low), np.subtract(high, mean)])
        ax.errorbar(ks, mean, yerr=err, capsize=2, label=label,
                    linestyle="--" if cell["reference"] else "-", **curve_style(curves_drawn))
        curves_drawn += 1
    if not curves_drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_xlabel("k (T = 0.07)")
    ax.set_ylabel("k-NN top-1 (%)")
    _percent_axis(ax, lows, highs)
    # Beside the axes, not in them: with a dozen curves an inner legend hides half the data.
    ax.legend(fontsize=6, loc="center left", bbox_to_anchor=(1.02, 0.5), frameon=False)
    ax.grid(alpha=0.3)
    data = _png(fig)
    plt.close(fig)
    return data


def loss_curve_plot(cells: pd.DataFrame) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    default_cells = cells[[(not r["reference"]) and _is_default_cell(r) and not r["setting"]
                           for _, r in cells.iterrows()]]
    default_cells = default_cells[[any(run.get("history") for run in runs)
                                   for runs in default_cells["runs"]]]
    if default_cells.empty:
        return None
    n = len(default_cells)
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (_, cell) in zip(axes.flat, default_cells.iterrows(), strict=False):
        for run in cell["runs"]:
            history = run.get("history", [])
            ax.plot([h["epoch"] for h in history], [h["loss"] for h in history],
                    label=f"seed {run['seed']}", lw=1)
        ax.set_title(f"{cell['dataset']} {cell['method']}/{cell['preset']}", fontsize=8)
        ax.set_xlabel("epoch", fontsize=7)
        ax.tick_params(labelsize=6)
        ax.legend(fontsize=5)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle("training loss (not comparable across methods)", fontsize=9)
    fig.tight_layout()
    data = _png(fig)
    plt.close(fig)
    return data


# --------------------------------------------------------------------------------------------
# assembly
# --------------------------------------------------------------------------------------------
def _filter_problems(record_set: RecordSet, runs_dir: Path, datasets: list[str]) -> None:
    """Keep the problems of the chosen datasets (the first folder under the runs directory);
    a problem whose dataset cannot be told is kept."""
    kept = []
    for problem in record_set.problems:
        try:
            first = Path(problem.run_dir).resolve().relative_to(runs_dir.resolve()).parts[0]
        except (ValueError, IndexError):
            kept.append(problem)
            continue
        if first in datasets or first not in _known_datasets():
            kept.append(problem)
    record_set.problems = kept


def _known_datasets() -> set[str]:
    from datasets import list_datasets

    return set(list_datasets())


def build_report(
    runs_dir: str | Path,
    plots: bool = True,
    paper_csv: Path = PAPER_CSV,
    datasets: list[str] | None = None,
    presets: PresetIndex | None = None,
) -> Report:
    """Every table of the report from the records under ``runs_dir`` (only ``datasets`` if given)."""
    record_set = load_records(runs_dir)
    elsewhere: set[str] = set()
    if datasets:
        elsewhere = {str(r["dataset"]) for r in record_set.records
                     if r.get("dataset") and r.get("dataset") not in datasets}
        record_set.records = [r for r in record_set.records if r.get("dataset") in datasets]
        _filter_problems(record_set, Path(runs_dir), datasets)
    report = Report(records=record_set.records)
    if elsewhere:
        report.notes["other_datasets"] = ", ".join(sorted(elsewhere))
    presets = presets or default_presets()
    cells = build_cells(record_set.records, presets)
    report.cells = cells
    report.notes["records"] = str(len(record_set.records))
    if datasets:
        report.notes["datasets"] = ",".join(datasets)
    if not cells.empty:
        deltas = deltas_table(cells)
        references = references_table(cells)
        report.tables["main"] = main_table(cells, references)
        report.tables["references"] = references
        report.tables["deltas"] = deltas
        report.tables["noise"] = noise_table(cells, deltas)
        report.tables.update(ablation_tables(cells, presets))
        report.tables["neighbour_agreement"] = agreement_table(cells)
        report.tables["paper_vs_reproduced"] = paper_table(cells, paper_csv)
        counts = paper_counts(cells, paper_csv)
        if counts:
            report.notes["paper_elsewhere"] = ", ".join(f"{k} ({v})" for k, v in counts.items())
    report.tables["problems"] = problems_table(record_set)
    if plots and not cells.empty:
        ablations = {k.split(":", 1)[1]: t for k, t in report.tables.items()
                     if k.startswith("ablation:")}
        report.plots.update(ablation_plots(ablations))
        curve = knn_curve_plot(cells)
        if curve:
            report.plots["knn_vs_k.png"] = curve
        losses = loss_curve_plot(cells)
        if losses:
            report.plots["training_loss.png"] = losses
    return report


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
def _md(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _budget(row: pd.Series | dict[str, Any]) -> str:
    return f"{row['backbone']}, {row['epochs']} ep, batch {row['batch_size']}"


def _short_commit(commit: str) -> str:
    if commit == "not recorded":
        return commit
    dirty = commit.endswith("-dirty")
    return commit.removesuffix("-dirty")[:10] + (" (uncommitted changes)" if dirty else "")


def provenance_line(runs: list[dict[str, Any]]) -> str:
    """"Provenance: …" for a table's runs; "Mixed provenance: …" with counts where they differ."""
    if not runs:
        return "Provenance: no runs."
    counts = {name: Counter() for name in PROVENANCE_FIELDS}
    for run in runs:
        for name, value in record_provenance(run).items():
            counts[name][_short_commit(value) if name == "commit" else value] += 1
    mixed = [name for name, c in counts.items() if len(c) > 1]
    parts = []
    for name, c in counts.items():
        if len(c) == 1:
            parts.append(f"{name} {next(iter(c))}")
        else:
            parts.append(f"{name} " + " / ".join(f"{v} ({n} runs)" for v, n in sorted(c.items())))
    if mixed:
        return (f"**Mixed provenance** ({', '.join(mixed)} differ between its {len(runs)} runs): "
                + "; ".join(parts) + ".")
    return f"Provenance ({len(runs)} runs): " + "; ".join(parts) + "."


def _runs_of(cells: pd.DataFrame, ids: list[str]) -> list[dict[str, Any]]:
    wanted = set(i for i in ids if i)
    return [r for _, c in cells.iterrows() if c["cell"] in wanted for r in c["runs"]]


def _metric_label(metric: str, runs: list[dict[str, Any]]) -> str:
    k = _knn_k(metric)
    if k is None:
        return dict((m, label) for m, label, _ in LINEAR_METRICS).get(metric, metric)
    temperatures = sorted({t for r in runs if metric in r.get("metrics", {})
                           for t in [knn_temperature(r, k)] if t is not None})
    label = f"k-NN k={k}" + (f" T={'/'.join(f'{t:g}' for t in temperatures)}" if temperatures else "")
    used = Counter(knn_k_used(r, k) for r in runs if metric in r.get("metrics", {}))
    if set(used) - {k}:
        total = sum(used.values())
        label += " (k used: " + ", ".join(
            f"{u} in {c}/{total} runs" if len(used) > 1 else str(u) for u, c in sorted(used.items())
        ) + ")"
    return label


def _shown_metrics(metrics: list[str], classes: Any) -> list[str]:
    """Top-5 is left out with ≤ 10 classes."""
    if classes is not None and not _is_nan(classes) and int(classes) < TOP5_MIN_CLASSES:
        return [m for m in metrics if not m.endswith("_top5")]
    return metrics


def _fmt_diff(row: dict[str, Any]) -> str:
    mean = row.get("mean_diff")
    if _is_nan(mean):
        return "–"
    if _is_nan(row.get("ci_low")):
        return f"{mean:+.2f}"
    return f"{mean:+.2f} [{row['ci_low']:+.2f}, {row['ci_high']:+.2f}]"


def _fmt_p_cell(value: Any, mark: bool = False) -> str:
    if _is_nan(value):
        return "–"
    return fmt_p(float(value)) + (MARK_SIGNIFICANT if mark else "")


def _fmt_power(row: dict[str, Any]) -> tuple[str, str]:
    mde = row.get("mde")
    if _is_nan(mde):
        return "–", "–"
    mark = MARK_BOOTSTRAP if str(row.get("test")) == "paired bootstrap" else ""
    needed = row.get("seeds_needed")
    if _is_nan(row.get("mean_diff")) or row.get("mean_diff") == 0:
        seeds = "–"
    elif needed is None or _is_nan(needed):
        seeds = f"more than {MAX_SEEDS}"
    else:
        seeds = str(int(needed)) + ("+" if mark else "")
    return f"{mde:.2f}{mark}", seeds


def _comparison_note(frame: pd.DataFrame, what: str) -> str:
    n_total = len(frame)
    n_family = int(frame["family_size"].iloc[0]) if "family_size" in frame and n_total else 0
    survivors = int(frame["significant"].sum()) if "significant" in frame else 0
    raw = int((frame["p_value"].astype(float) < ALPHA).sum()) if "p_value" in frame else 0
    return (
        f"Family: the {n_family} comparisons with a p-value in this table ({what}); "
        f"{raw} have raw p < {ALPHA}, {survivors} survive Holm's correction "
        f"(p Holm < {ALPHA}, marked {MARK_SIGNIFICANT})."
    )


COMPARISONS_LEGEND = (
    "**Comparisons.** Every table of comparisons is one family: `p Holm` is Holm's step-down "
    "adjusted p-value (family-wise error), `q BH` the Benjamini–Hochberg q-value (false "
    f"discovery rate); the mark {MARK_SIGNIFICANT} uses p Holm < {ALPHA}, never the raw p. "
    f"`MDE`: the smallest true Δ that a two-sided paired t-test at α = {ALPHA} detects with power "
    f"{POWER}, from the observed SD of the per-seed Δ and n (noncentral t). `seeds for Δ`: the "
    f"matched seeds that would detect the observed Δ with that power (searched up to "
    f"{MAX_SEEDS}). {MARK_BOOTSTRAP} one matched seed: both from the paired bootstrap's SE over "
    "test images (MDE = 2.80 × SE), which holds test-set sampling only: the spread of Δ across "
    "training seeds, which one seed cannot show, may be smaller or larger, so read the seed "
    "count, marked +, as a rough guide."
)


def render_markdown(report: Report, command: str = DEFAULT_COMMAND) -> str:
    scope = report.notes.get("datasets")
    out = [
        "# groupbench results" + (f": {scope}" if scope else ""),
        "",
        f"Generated by `{command}` from {report.notes.get('records', 0)} run records; one row "
        "per run (config keys that vary, seed, every metric, provenance) is in `runs.csv` next "
        "to this file.",
        "",
        "**Protocol** (`groupbench-v1`, docs/protocol.md): final checkpoint only; pooled backbone "
        "features under the deterministic eval transform; weighted k-NN on L2-normalised "
        "features, whole train split as the bank (k=20, T=0.07 headline; k=200, T=0.1); linear "
        "probe = multinomial logistic regression on standardised frozen features, λ chosen on a "
        "stratified 10% hold-out of the train split. Accuracies in % on the test split: mean ± "
        "95% Student-t half-width over n seeds, and (s …) the sample SD over seeds (ddof = 1).",
        "",
        "**Marks.** " + LEGEND,
        "",
        COMPARISONS_LEGEND,
        "",
    ]
    main = report.tables.get("main")
    if main is None or main.empty:
        others = report.notes.get("other_datasets")
        out += ["No finished runs yet." + (f" The directory's other records are of {others}."
                                           if others else ""), ""]
    else:
        for dataset in sorted(main["dataset"].unique()):
            out += _render_dataset(report, dataset)
        out += _render_agreement(report)
        out += _render_paper(report)
        out += _render_plots(report.plots)
    problems = report.tables.get("problems")
    out += ["## Failed, unfinished, unreadable or duplicate runs", ""]
    if problems is None or problems.empty:
        out += ["None.", ""]
    else:
        out += [_md(["status", "run", "detail"], problems.values.tolist()), ""]
    return "\n".join(out)


def _rows_of(table: pd.DataFrame | None, dataset: str) -> pd.DataFrame:
    if table is None or table.empty or "dataset" not in table:
        return pd.DataFrame()
    return table[table["dataset"] == dataset]


def _render_dataset(report: Report, dataset: str) -> list[str]:
    cells = report.cells[report.cells["dataset"] == dataset]
    runs = [r for rs in cells["runs"] for r in rs]
    out = _render_noise(_rows_of(report.tables.get("noise"), dataset), dataset, runs)
    out += _render_main(report, dataset, cells)
    out += _render_references(report, dataset)
    out += _render_deltas(report, dataset)
    for name, table in report.tables.items():
        if name.startswith("ablation:"):
            key = name.split(":", 1)[1]
            out += _render_ablation(report, dataset, key, _rows_of(table, dataset),
                                    _rows_of(report.tables.get(f"ablation_vs_default:{key}"), dataset))
    return out


def _render_noise(noise: pd.DataFrame, dataset: str, runs: list[dict[str, Any]]) -> list[str]:
    out = [f"## How to read this: {dataset}", ""]
    if noise.empty:
        return out + ["The records do not state the number of test images.", ""]
    r = noise.iloc[0]
    metric = _metric_label(r["metric"], runs) if r["metric"] else "the headline k-NN"
    lines = [
        f"- Test split: N_test = {r['n_test']:,} images"
        + (" (it differs between runs)" if r["n_test_varies"] else "")
        + (f", N_train = {int(r['n_train']):,}" if not _is_nan(r["n_train"]) else "")
        + (f", {int(r['n_classes'])} classes" if not _is_nan(r["n_classes"]) else "") + ".",
        f"- One test image is worth {r['one_image']:.3g} points: accuracies move in steps of "
        "that size.",
    ]
    if not _is_nan(r["accuracy"]):
        lines.append(
            f"- At the observed {metric} accuracy (mean {r['accuracy']:.2f}%, range "
            f"{r['accuracy_min']:.2f}–{r['accuracy_max']:.2f}), the binomial standard error of one "
            f"run's accuracy is {r['binomial_se']:.2f} points: test-set sampling alone moves a "
            f"single number by about ±{1.96 * r['binomial_se']:.2f} (95%)."
        )
    for name, label in (("knn", metric), ("linear", "linear top-1")):
        if r[f"comparisons_{name}"]:
            lines.append(
                f"- A typical method-vs-base comparison on {label} (median over "
                f"{r[f'comparisons_{name}']}) can detect a true Δ of {r[f'typical_mde_{name}']:.2f} "
                f"points (MDE at α = {ALPHA}, power {POWER}); a smaller true gain would usually "
                "go undetected with these seeds."
            )
    return out + lines + [""]


def _render_main(report: Report, dataset: str, cells: pd.DataFrame) -> list[str]:
    main = _rows_of(report.tables.get("main"), dataset)
    runs = [r for rs in cells["runs"] for r in rs]
    metrics = _shown_metrics(metric_names(runs), cells["n_classes"].iloc[0])
    has_refs = bool(main["reference"].any())
    out = [f"## Main table: {dataset}", "", provenance_line(runs), ""]
    if not has_refs:
        out += ["No reference rows for this dataset: run `python -m eval.grid -m "
                f"method=pixels,random_init dataset={dataset} seed=0,1,2`.", ""]
    else:
        out += [
            "Reference rows first (`reference`: raw standardised pixels, the untrained backbone). "
            "\"beats refs\": whether the method beats every reference row, on the headline k-NN "
            "and on linear top-1 — its mean is above the reference's and the difference is "
            "significant after Holm's correction over the comparisons of the methods-vs-"
            "references table below (\"no (x)\": at or below reference x).",
            "",
        ]
    header = ["dataset", "method", "preset", "budget", "setting", "protocol"]
    header += [_metric_label(m, runs) for m in metrics] + ["n", "seeds"]
    if has_refs:
        header += ["beats refs (k-NN / linear)"]
    header += ["train s/run", "img/s"]
    rows = []
    for _, r in main.iterrows():
        values = []
        for m in metrics:
            text = fmt_interval(r, m)
            if m == "linear_top1":
                text += _flag_text(r)
            values.append(text)
        row = [r["dataset"], r["method"], r["preset_label"],
               "not trained" if r["reference"] else _budget(r), r["setting"] or "–", r["protocol"]]
        row += values + [r["n"], r["seeds"]]
        if has_refs:
            row += ["–" if r["reference"] else
                    f"{r['beats_references_knn']} / {r['beats_references_linear']}"]
        row += (["–", "–"] if r["reference"] else
                [f"{r['train_seconds']:.0f}", f"{r['images_per_second']:.0f}"])
        rows.append(row)
    out += [_md(header, rows), ""]
    out += _flag_notes(main, report.cells)
    dropped = [m for m in metric_names(runs) if m not in metrics]
    if dropped:
        out += [f"Linear top-5 is not shown: {dataset} has {int(cells['n_classes'].iloc[0])} "
                "classes, so it is near 100 for any representation.", ""]
    return out


def _flag_notes(table: pd.DataFrame, cells: pd.DataFrame) -> list[str]:
    from eval.linear import DEFAULT_LAMBDAS

    notes = []
    for _, r in table.iterrows():
        name = f"{r['method']}/{r['preset']}" + (f" ({r['setting']})" if r.get("setting") else "")
        if r.get("lambda_edge"):
            picks = ", ".join(f"seed {s}: λ = {lam:g}" if lam is not None else f"seed {s}"
                              for s, lam in r["lambda_edge"])
            lams = {lam for _, lam in r["lambda_edge"] if lam is not None}
            why = []
            if any(lam >= max(DEFAULT_LAMBDAS) for lam in lams):
                why.append("at the largest λ a stronger penalty than the grid offers might score "
                           "higher on the hold-out")
            if any(lam <= min(DEFAULT_LAMBDAS) for lam in lams):
                why.append("at the smallest λ a weaker penalty might score higher")
            notes.append(
                f"- {name}: λ at an end of the grid {min(DEFAULT_LAMBDAS):g}…"
                f"{max(DEFAULT_LAMBDAS):g} ({picks}); "
                + ("; ".join(why) or "the optimum may lie outside the grid")
                + ", so the probe's top-1 may understate what the features allow."
            )
        if r.get("unconverged"):
            its = "; ".join(f"seed {s}" + (f": {_iterations_text(it)}" if it is not None else "")
                            for s, it in r["unconverged"])
            notes.append(
                f"- {name}: the probe's solver did not reach its gradient tolerance within its iteration "
                f"limit ({its}); the probe's accuracy is that of an unfinished fit."
            )
    return (["Flags:", "", *notes, ""] if notes else [])


def _iterations_text(value: Any) -> str:
    if isinstance(value, dict):
        return "iterations " + ", ".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, list):
        return "iterations " + ", ".join(str(v) for v in value)
    return f"iterations {value}"


def _short_metric(metric: str) -> str:
    """knn20_top1 → "k-NN k=20", linear_top1 → "linear top-1" (the table's column names)."""
    k = _knn_k(metric)
    if k is not None:
        return f"k-NN k={k}"
    return dict((m, label) for m, label, _ in LINEAR_METRICS).get(metric, metric)


def _txt(value: Any) -> str:
    """A table cell's text: "–" for nothing (None, NaN, "")."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value == "":
        return "–"
    return str(value)


def _comparison_rows(frame: pd.DataFrame, lead: list[str]) -> list[list[Any]]:
    rows = []
    for r in frame.to_dict("records"):
        mde, seeds = _fmt_power(r)
        note = "; ".join(x for x in (r.get("unmatched"), r.get("note"))
                         if isinstance(x, str) and x)
        rows.append([_txt(r.get(k)) for k in lead] + [
            _short_metric(r["metric"]), int(r.get("n_matched", 0)), _txt(r.get("per_seed")), _fmt_diff(r),
            _fmt_p_cell(r.get("p_value")), _fmt_p_cell(r.get("p_holm"), bool(r.get("significant"))),
            _fmt_p_cell(r.get("q_bh")), _txt(r.get("test")), mde, seeds, note or "–",
        ])
    return rows


COMPARISON_HEADER = ["metric", "n", "per-seed Δ", "mean Δ [95% CI]", "p", "p Holm", "q BH",
                     "test", "MDE", "seeds for Δ", "unmatched seeds / note"]


def _render_references(report: Report, dataset: str) -> list[str]:
    refs = _rows_of(report.tables.get("references"), dataset)
    if refs.empty:
        return []
    out = [f"## Methods vs the reference rows: {dataset}", ""]
    out += [provenance_line(_runs_of(report.cells, [*refs["cell"], *refs["reference_cell"]])), ""]
    out += [
        "Δ = method − reference; paired over matched seeds (t-test), else a one-sample t-test "
        "against a single reference value or Welch's t-test; one matched seed: paired bootstrap "
        "over test images. A method **beats** a reference when Δ > 0 and p Holm < "
        f"{ALPHA} (one matched seed: the bootstrap interval lies above 0). "
        + _comparison_note(refs, "every method against every reference, both metrics"),
        "",
    ]
    refs = refs.assign(variant=[f"{r['method']}/{r['preset']}" for _, r in refs.iterrows()],
                       setting_text=[r["setting"] or "–" for _, r in refs.iterrows()])
    header = ["method", "setting", "reference", *COMPARISON_HEADER, "verdict"]
    rows = _comparison_rows(refs, ["variant", "setting_text", "reference"])
    rows = [row + [v] for row, v in zip(rows, refs["verdict"], strict=True)]
    return out + [_md(header, rows), ""]


def _render_deltas(report: Report, dataset: str) -> list[str]:
    out = [f"## Gain over each method's base: {dataset}", ""]
    deltas = _rows_of(report.tables.get("deltas"), dataset)
    if deltas.empty:
        return out + ["No method with a base has been run with it yet.", ""]
    ids = [*deltas["cell"], *deltas.get("base_cell", pd.Series(dtype=object)).dropna()]
    out += [provenance_line(_runs_of(report.cells, ids)), ""]
    out += [
        "Δ = method − base per seed on the same data, budget, backbone and evaluation; mean Δ "
        "with its 95% t-interval and the two-sided paired t-test p-value (`scipy.stats."
        "ttest_rel`); with one matched seed a paired bootstrap over test images (no p-value). "
        + _comparison_note(deltas, "every method against its base, both metrics"),
        "",
    ]
    deltas = deltas.assign(
        variant=[f"{r['method']}/{r['preset']}" for _, r in deltas.iterrows()],
        budget=[_budget(r) for _, r in deltas.iterrows()],
        setting_text=[r["setting"] or "–" for _, r in deltas.iterrows()],
    )
    header = ["method", "base", "budget", "setting", *COMPARISON_HEADER]
    rows = _comparison_rows(deltas, ["variant", "base", "budget", "setting_text"])
    return out + [_md(header, rows), ""]


def _render_ablation(report: Report, dataset: str, key: str, table: pd.DataFrame,
                     versus: pd.DataFrame) -> list[str]:
    if table.empty:
        return []
    out = []
    for (method, preset, context), group in table.groupby(["method", "preset", "context"],
                                                          sort=True):
        title = f"## Ablation `{key}`: {dataset}, {method}/{preset}" + (
            f" at {context}" if context else "")
        runs = _runs_of(report.cells, list(group["cell"]))
        metrics = _shown_metrics(metric_names(runs), group["n_classes"].iloc[0])
        out += [title, "", provenance_line(runs), ""]
        defaults = group[group["is_default"].astype(bool)]
        default_text = (
            f"The {defaults['default_label'].iloc[0]} value is marked (default)."
            if not defaults.empty else "The default value was not run in this setting.")
        out += [
            f"Only cells equal in every config key but `{key}` (and the seed)"
            + (f"; the other swept keys are fixed at {context}" if context else "")
            + f"; budget: {_budget(group.iloc[0])}. {default_text}",
            "",
        ]
        header = [key] + [_metric_label(m, runs) for m in metrics] + ["n", "seeds"]
        rows = []
        for _, r in group.iterrows():
            value = f"**{r['value']}** ({r['default_label']})" if r["is_default"] else r["value"]
            values = [fmt_interval(r, m) + (_flag_text(r) if m == "linear_top1" else "")
                      for m in metrics]
            rows.append([value, *values, r["n"], r["seeds"]])
        out += [_md(header, rows), ""]
        out += _flag_notes(group.assign(setting=f"{key}=" + group["value"].astype(str)),
                           report.cells)
        mine = versus[(versus["method"] == method) & (versus["preset"] == preset)
                      & (versus["context"] == context)] if not versus.empty else versus
        if not mine.empty:
            out += [f"Each value against the default value ({mine['default'].iloc[0]}). "
                    + _comparison_note(mine, f"the values of `{key}` against the default"), ""]
            header = [key, *COMPARISON_HEADER]
            out += [_md(header, _comparison_rows(mine, ["value"])), ""]
        name = _plot_name(key)
        if name in report.plots:
            out += [f"![{key}]({name})", ""]
    return out


def _render_agreement(report: Report) -> list[str]:
    table = report.tables.get("neighbour_agreement")
    if table is None or table.empty:
        return []
    out = [
        "## Local-neighbourhood consistency",
        "",
        provenance_line(report.records),
        "",
        "Per test image, the % of its k nearest train neighbours (cosine, pooled features) that "
        "share its label; mean ± 95% t half-width over seeds.",
        "",
    ]
    header = ["dataset", "method", "preset", "budget", "setting"] + [f"k={k}" for k in AGREEMENT_KS] + ["n"]
    rows = [
        [r["dataset"], r["method"], r["preset_label"],
         "not trained" if r["preset_label"] == "reference" else _budget(r), r["setting"] or "–"]
        + [fmt_interval(r, f"agree_k{k}") for k in AGREEMENT_KS] + [r["n"]]
        for _, r in table.iterrows()
    ]
    return out + [_md(header, rows), ""]


def _render_paper(report: Report) -> list[str]:
    table = report.tables.get("paper_vs_reproduced")
    out = ["## Paper vs reproduced", ""]
    elsewhere = report.notes.get("paper_elsewhere")
    if table is None or table.empty:
        out += ["No published numbers for the methods and datasets run here."]
        if elsewhere:
            out += ["", f"Published rows of these methods on other datasets: {elsewhere}."]
        return out + [""]
    matched = table[table["cell"].notna()]
    out += [provenance_line(_runs_of(report.cells, list(matched["cell"]))), ""] if not matched.empty else []
    out.append(
        "Published numbers (`eval/paper_results.csv`, with their source and protocol) for the "
        "methods and datasets run here. A paper row is joined with a cell only when dataset, "
        "backbone and epochs agree, the cell runs the method's default preset unchanged (the "
        "paper's method name is one of the method's `paper_aliases`, without a named variant), "
        "and the metric's settings agree (k-NN: the same k actually used and the same T; linear: "
        "the same probe). Otherwise the row reads \"no comparable run\" and says why."
        + (f" Published rows of these methods on datasets not run here: {elsewhere}."
           if elsewhere else "")
    )
    out.append("")
    header = ["paper method", "dataset", "backbone", "paper ep", "metric", "paper", "paper protocol",
              "ours", "our protocol", "Δ (ours − paper)", "source", "verified"]
    rows = []
    for _, r in table.iterrows():
        diff = "–" if math.isnan(r["difference"]) else f"{r['difference']:+.2f}"
        epochs = "–" if pd.isna(r["paper epochs"]) else r["paper epochs"]
        ours = r["ours"] if r["why"] == "" else f"{r['ours']}: {r['why']}"
        rows.append([
            r["paper method"], r["dataset"], r["backbone"], epochs, r["metric"], f"{r['paper']:.2f}",
            r["paper protocol"], ours, r["our_protocol"] or "–", diff, r["source"], r["verified"],
        ])
    return out + [_md(header, rows), ""]


def _render_plots(plots: dict[str, bytes]) -> list[str]:
    out = []
    if "knn_vs_k.png" in plots:
        out += ["## k-NN accuracy vs k", "", "![k-NN vs k](knn_vs_k.png)", ""]
    if "training_loss.png" in plots:
        out += ["## Training loss", "", "![training loss](training_loss.png)", ""]
    return out


def tables_frame(report: Report) -> pd.DataFrame:
    """Every table stacked into one frame with a ``table`` column (the CSV/JSON form)."""
    frames = [_plain(t).assign(table=name) for name, t in report.tables.items() if not t.empty]
    if not frames:
        return pd.DataFrame(columns=["table"])
    frame = pd.concat(frames, ignore_index=True, sort=False)
    return frame[["table", *[c for c in frame.columns if c != "table"]]]


def _plain(table: pd.DataFrame) -> pd.DataFrame:
    """Lists in cells (flags) as text, so CSV and JSON hold plain values."""
    table = table.copy()
    for column in table.columns:
        if table[column].map(lambda v: isinstance(v, (list, tuple, dict))).any():
            table[column] = table[column].map(
                lambda v: json.dumps(v, default=str) if isinstance(v, (list, tuple, dict)) else v)
    return table


def render(report: Report, fmt: str, command: str = DEFAULT_COMMAND) -> str:
    if fmt == "markdown":
        return render_markdown(report, command)
    if fmt == "csv":
        return tables_frame(report).to_csv(index=False)
    if fmt == "json":
        return json.dumps(
            {name: json.loads(_plain(t).to_json(orient="records"))
             for name, t in report.tables.items()},
            indent=2,
        ) + "\n"
    raise ValueError(f"unknown format {fmt!r}; valid: markdown, csv, json")


def write_plots(report: Report, plots_dir: str | Path) -> None:
    from engine.io import atomic_write_bytes

    for name, data in report.plots.items():
        atomic_write_bytes(Path(plots_dir) / name, data, hint="Choose a writable --plots-dir.")


def write_runs_csv(report: Report, path: str | Path) -> None:
    """``runs.csv``: one row per run (:func:`runs_frame`), written atomically."""
    from engine.io import atomic_write_text

    atomic_write_text(path, runs_frame(report.records).to_csv(index=False),
                      hint="Choose a writable --runs-csv path.")


def write_output(text: str, path: str | Path) -> None:
    """The rendered report, atomically: a report killed mid-write leaves the previous file whole
    (a shell redirect, ``> results/table.md``, truncates it before the report even starts)."""
    from engine.io import atomic_write_text

    atomic_write_text(path, text, hint="Choose a writable --output path.")


def _command(args: argparse.Namespace) -> str:
    """The command that regenerates this report's text (plots and runs.csv go where they go)."""
    if args.runs == "results/runs" and not args.dataset and not args.output and args.format == "markdown":
        return DEFAULT_COMMAND
    parts = ["python -m eval.report"]
    if args.runs != "results/runs":
        parts.append(f"--runs {args.runs}")
    if args.dataset:
        parts.append(f"--dataset {','.join(args.dataset)}")
    if args.format != "markdown":
        parts.append(f"--format {args.format}")
    if args.output:
        parts.append(f"--output {args.output}")
    return " ".join(parts)


def _datasets(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    known = _known_datasets()
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown dataset {', '.join(unknown) or repr(text)}; valid: {', '.join(sorted(known))}")
    return names


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m eval.report",
        description="Aggregate the run records into the benchmark report (markdown by default), "
                    "with plots and runs.csv next to it.",
        epilog=(
            "examples:\n"
            "  python -m eval.report > results/table.md\n"
            "      every record; plots and runs.csv go to results/\n"
            "  python -m eval.report --dataset fashion_mnist --output results/fashion_mnist/table.md\n"
            "      one dataset's table, its plots and runs.csv in results/fashion_mnist/\n"
            "  python -m eval.report --dataset fashion_mnist --plots-dir results/fashion_mnist"
            " > results/fashion_mnist/table.md\n"
            "      the same with a shell redirect"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--runs", default="results/runs", help="directory of run records")
    parser.add_argument(
        "--dataset", type=_datasets, default=None,
        help="only these datasets (comma-separated), e.g. fashion_mnist; default: every dataset",
    )
    parser.add_argument("--format", default="markdown", choices=["markdown", "csv", "json"])
    parser.add_argument(
        "--output", "-o", default=None,
        help="write the report to this file (atomically: temp file, fsync, rename) instead of "
             "stdout; the plots and runs.csv then default to its directory",
    )
    parser.add_argument(
        "--plots-dir", "--plots", dest="plots_dir", default=None,
        help="where the PNG plots and runs.csv are written (default: the --output file's "
             "directory, else results; the markdown links them by file name, so keep it the "
             "directory of the markdown file); 'none' skips both",
    )
    parser.add_argument(
        "--runs-csv", default=None,
        help="where runs.csv (one row per run: varying config keys, seed, every metric, "
             "provenance) is written (default: <plots dir>/runs.csv with markdown output); "
             "'none' skips it",
    )
    args = parser.parse_args(argv)
    if not Path(args.runs).exists():
        print(f"error: no run records: {args.runs} does not exist; run `python -m eval.grid -m` "
              "first or pass --runs DIR", file=sys.stderr)
        sys.exit(2)
    plots_dir = args.plots_dir
    if plots_dir is None:
        plots_dir = str(Path(args.output).parent) if args.output else "results"
    want_files = plots_dir.lower() != "none" and args.format == "markdown"
    runs_csv = args.runs_csv
    if runs_csv is None:
        runs_csv = str(Path(plots_dir) / "runs.csv") if want_files else "none"
    report = build_report(args.runs, plots=want_files, datasets=args.dataset)
    if want_files:
        try:
            write_plots(report, plots_dir)
        except OSError as exc:
            print(f"error: cannot write plots to {plots_dir}: {exc}", file=sys.stderr)
            sys.exit(2)
    if runs_csv.lower() != "none":
        try:
            write_runs_csv(report, runs_csv)
        except OSError as exc:
            print(f"error: cannot write runs.csv to {runs_csv}: {exc}", file=sys.stderr)
            sys.exit(2)
    text = render(report, args.format, _command(args))
    if args.output is None:
        sys.stdout.write(text)
        return
    try:
        write_output(text, args.output)
    except OSError as exc:
        print(f"error: cannot write the report to {args.output}: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from engine.distributed import skip_exit_collection

    skip_exit_collection()
    main()
