"""``python -m eval.report > results/table.md``: every run record, aggregated over seeds.

A *cell* is a set of runs that agree on everything but the seed: protocol, dataset, method,
preset, backbone, budget and every hyperparameter (eval.records.cell_id). Cells are never merged,
so records of different protocols or budgets are never averaged together.

Sections (markdown by default; ``--format csv|json`` gives the same tables as data):
- main table: k-NN top-1 (k=20, k=200), linear top-1/top-5, mean ± 95% Student-t half-width over
  n seeds; with n = 1 a percentile bootstrap over test images, labelled;
- deltas over each method's base on matched seeds (paired t-test, or a paired bootstrap with one
  matched seed), with unmatched seeds listed;
- one ablation table per swept hyperparameter (a config key that varies between cells that are
  otherwise equal);
- local-neighbourhood consistency (fraction of each test image's k nearest train neighbours that
  share its label);
- paper vs reproduced (``eval/paper_results.csv``), each side with its own protocol;
- failed, unfinished and unreadable runs, never silently dropped;
- plots (matplotlib PNGs next to the markdown): accuracy vs group size (and every other numeric
  swept key) with CI bars, k-NN accuracy vs k, training-loss curves.

Every file the report writes goes through ``engine.io``'s atomic writer (temp file, fsync,
rename): the plots, and the report itself with ``--output FILE``. Printing to stdout stays the
default; a shell redirect into the file truncates it before the report starts, so an interrupted
``> results/table.md`` leaves it empty where ``--output results/table.md`` leaves the old one.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from eval.records import RecordSet, cell_id, flatten, load_records, unpack_bits
from eval.stats import (
    BOOTSTRAP_LABEL,
    bootstrap_ci,
    fmt_p,
    paired_bootstrap,
    paired_comparison,
    t_interval,
)

KEY_COLUMNS = ["dataset", "method", "preset", "backbone", "epochs", "batch_size"]
# (record metric, column label, correctness vector for the n = 1 bootstrap)
METRICS = [
    ("knn20_top1", "k-NN k=20", "knn20"),
    ("knn200_top1", "k-NN k=200", "knn200"),
    ("linear_top1", "linear top-1", "linear"),
    ("linear_top5", "linear top-5", None),
]
DELTA_METRICS = [("knn20_top1", "knn20"), ("linear_top1", "linear")]
AGREEMENT_KS = ("1", "5", "20", "50", "200")
PAPER_CSV = Path(__file__).resolve().parent / "paper_results.csv"
# Config keys that are bookkeeping, not hyperparameters.
IGNORED_SWEEP_KEYS = {"method.base"}
DEFAULT_COMMAND = "python -m eval.report > results/table.md"


@dataclass
class Report:
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    plots: dict[str, bytes] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# cells
# --------------------------------------------------------------------------------------------
def _summary(values: list[float], correct: list[np.ndarray | None]) -> dict[str, Any]:
    if len(values) >= 2:
        s = t_interval(values)
        return {"mean": s.mean, "low": s.low, "high": s.high, "kind": "t", "n": s.n}
    if values and correct and correct[0] is not None:
        mean, low, high = bootstrap_ci(correct[0])
        return {"mean": values[0], "low": low, "high": high, "kind": "bootstrap", "n": 1}
    if values:
        return {"mean": values[0], "low": math.nan, "high": math.nan, "kind": "none", "n": 1}
    return {"mean": math.nan, "low": math.nan, "high": math.nan, "kind": "none", "n": 0}


def _correct(record: dict[str, Any], key: str | None) -> np.ndarray | None:
    packed = record.get("correct", {}).get(key) if key else None
    if packed is None:
        return None
    return unpack_bits(packed, int(record["metrics"]["n_test"]))


def build_cells(records: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per cell: key columns, the runs, per-seed values and each metric's interval."""
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
            n=len(runs),
            seeds=",".join(str(r["seed"]) for r in runs),
            train_seconds=float(np.mean([r.get("train_seconds", math.nan) for r in runs])),
            images_per_second=float(np.mean([r.get("images_per_second", math.nan) for r in runs])),
            flat_config=flatten(first.get("config", {})),
            runs=runs,
        )
        for metric, _, correct_key in METRICS:
            values = [float(r["metrics"][metric]) for r in runs if metric in r["metrics"]]
            summary = _summary(values, [_correct(r, correct_key) for r in runs])
            for part, value in summary.items():
                row[f"{metric}_{'ci_' + part if part in ('low', 'high', 'kind') else part}"] = value
        rows.append(row)
    cells = pd.DataFrame(rows)
    if cells.empty:
        return cells
    cells["setting"] = [_setting(row, cells) for _, row in cells.iterrows()]
    return cells.sort_values([*KEY_COLUMNS, "setting"]).reset_index(drop=True)


def _varying_keys(configs: list[dict[str, Any]]) -> list[str]:
    keys = sorted({k for c in configs for k in c} - {"seed"} - IGNORED_SWEEP_KEYS)
    return [k for k in keys if len({json.dumps(c.get(k), default=str) for c in configs}) > 1]


def _setting(row: pd.Series, cells: pd.DataFrame) -> str:
    """The keys that tell this cell apart from the other cells with the same key columns."""
    same = cells[(cells[KEY_COLUMNS] == row[KEY_COLUMNS]).all(axis=1)]
    if len(same) <= 1:
        return ""
    varying = _varying_keys(list(same["flat_config"]))
    return ", ".join(f"{k}={row['flat_config'].get(k)}" for k in varying)


def fmt_interval(row: pd.Series | dict[str, Any], metric: str) -> str:
    mean = row.get(f"{metric}_mean")
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    kind = row.get(f"{metric}_ci_kind")
    if kind == "t":
        return f"{mean:.2f} ± {(row[f'{metric}_ci_high'] - mean):.2f}"
    if kind == "bootstrap":
        return f"{mean:.2f} [{row[f'{metric}_ci_low']:.2f}, {row[f'{metric}_ci_high']:.2f}]†"
    return f"{mean:.2f}"


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def main_table(cells: pd.DataFrame) -> pd.DataFrame:
    columns = [*KEY_COLUMNS, "setting", "protocol", "n", "seeds"]
    for metric, _, _ in METRICS:
        columns += [f"{metric}_mean", f"{metric}_ci_low", f"{metric}_ci_high", f"{metric}_ci_kind"]
    columns += ["train_seconds", "images_per_second"]
    return cells[columns].copy()


def agreement_table(cells: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for _, cell in cells.iterrows():
        row = {key: cell[key] for key in [*KEY_COLUMNS, "setting", "n"]}
        for k in AGREEMENT_KS:
            values = [
                r["metrics"].get("neighbour_agreement", {}).get(k) for r in cell["runs"]
            ]
            values = [float(v) for v in values if v is not None]
            summary = _summary(values, [])
            row[f"agree_k{k}_mean"] = summary["mean"]
            row[f"agree_k{k}_ci_low"] = summary["low"]
            row[f"agree_k{k}_ci_high"] = summary["high"]
            row[f"agree_k{k}_ci_kind"] = summary["kind"]
        rows.append(row)
    return pd.DataFrame(rows)


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
    """Each method cell against its base cell(s) under the same data/budget/backbone/eval."""
    rows = []
    for _, cell in cells.iterrows():
        base = _base_of(cell)
        if base is None:
            continue
        context = _context(cell["flat_config"])
        candidates = cells[
            (cells["method"] == base[0]) & (cells["preset"] == base[1])
            & (cells["protocol"] == cell["protocol"])
        ]
        candidates = [b for _, b in candidates.iterrows() if _context(b["flat_config"]) == context]
        if not candidates:
            rows.append({
                **{k: cell[k] for k in [*KEY_COLUMNS, "setting"]},
                "base": f"{base[0]}/{base[1]}", "metric": "all", "n_matched": 0,
                "note": "base not run under the same data, budget and evaluation",
            })
            continue
        for base_cell in candidates:
            method_runs = {r["seed"]: r for r in cell["runs"]}
            base_runs = {r["seed"]: r for r in base_cell["runs"]}
            for metric, correct_key in DELTA_METRICS:
                m = {s: r["metrics"][metric] for s, r in method_runs.items() if metric in r["metrics"]}
                b = {s: r["metrics"][metric] for s, r in base_runs.items() if metric in r["metrics"]}
                paired = paired_comparison(m, b)
                row = {
                    **{k: cell[k] for k in [*KEY_COLUMNS, "setting"]},
                    "base": f"{base[0]}/{base[1]}", "metric": metric, "n_matched": paired.n,
                    "seeds": ",".join(str(s) for s, _ in paired.diffs),
                    "per_seed": "; ".join(f"{s}: {d:+.2f}" for s, d in paired.diffs),
                    "mean_diff": paired.mean_diff, "ci_low": paired.low, "ci_high": paired.high,
                    "p_value": paired.p_value, "test": "paired t" if paired.n >= 2 else "",
                    "unmatched": _unmatched(paired.unmatched_method, paired.unmatched_base),
                    "note": paired.note,
                }
                if paired.n == 1:
                    seed = paired.diffs[0][0]
                    mc, bc = _correct(method_runs[seed], correct_key), _correct(base_runs[seed], correct_key)
                    if mc is not None and bc is not None:
                        diff, low, high = paired_bootstrap(mc, bc)
                        row.update(mean_diff=diff, ci_low=low, ci_high=high, test="paired bootstrap")
                rows.append(row)
    return pd.DataFrame(rows)


def _unmatched(method_only: list[int], base_only: list[int]) -> str:
    parts = []
    if method_only:
        parts.append("method only: " + ",".join(map(str, method_only)))
    if base_only:
        parts.append("base only: " + ",".join(map(str, base_only)))
    return "; ".join(parts)


def ablation_tables(cells: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """One table per swept key: cells equal in everything but that key (and the seed)."""
    tables: dict[str, list[dict[str, Any]]] = {}
    group_cols = [c for c in KEY_COLUMNS if c not in ("epochs", "batch_size")] + ["protocol"]
    for _, group in cells.groupby(group_cols, dropna=False, sort=True):
        if len(group) < 2:
            continue
        configs = list(group["flat_config"])
        for key in _varying_keys(configs):
            others = [k for k in _varying_keys(configs) if k != key]
            for _, cell in group.iterrows():
                row = {k: cell[k] for k in KEY_COLUMNS}
                row["value"] = cell["flat_config"].get(key)
                row["other settings"] = ", ".join(
                    f"{k}={cell['flat_config'].get(k)}" for k in others
                )
                row["n"] = cell["n"]
                row["seeds"] = cell["seeds"]
                for metric, _, _ in METRICS:
                    for suffix in ("mean", "ci_low", "ci_high", "ci_kind"):
                        row[f"{metric}_{suffix}"] = cell[f"{metric}_{suffix}"]
                tables.setdefault(key, []).append(row)
    out = {}
    for key, rows in tables.items():
        frame = pd.DataFrame(rows)
        order = frame["value"].map(lambda v: (0, float(v)) if _is_number(v) else (1, str(v)))
        out[key] = frame.assign(_order=order).sort_values(
            ["dataset", "method", "preset", "other settings", "_order"]
        ).drop(columns="_order").reset_index(drop=True)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_PAPER_ALIASES = {
    "moco": ("moco", "mocov2", "mocov2plus"),
    "simclr": ("simclr",),
    "groco": ("groco",),
    "nnclr": ("nnclr",),
    "cld": ("cld",),
    "ascl": ("ascl",),
    "all4one": ("all4one",),
}


def _paper_method(name: str) -> str | None:
    """Our method name for a paper_results.csv row ('groco (2x224)' → groco, 'npid+cld' → cld)."""
    tokens = re.split(r"[\s(+]+", name.lower())
    for ours, aliases in _PAPER_ALIASES.items():
        if ours == "cld" and "cld" in tokens:
            return "cld"
        if tokens and tokens[0] in aliases and "cld" not in tokens:
            return ours
    return None


_OUR_PROTOCOL = {
    "knn20_top1": "k-NN k=20 T=0.07",
    "knn200_top1": "k-NN k=200 T=0.1",
    "linear_top1": "L-BFGS probe, λ on train hold-out",
}


def paper_table(cells: pd.DataFrame, paper_csv: Path = PAPER_CSV) -> pd.DataFrame:
    """Published numbers for the methods we ran, joined with ours where dataset/backbone match."""
    if not paper_csv.exists():
        return pd.DataFrame()
    paper = pd.read_csv(paper_csv, dtype={"epochs": "Int64", "batch_size": "Int64"})
    paper["ours_method"] = paper["method"].map(_paper_method)
    ran = set(cells["method"]) if not cells.empty else set()
    paper = paper[paper["ours_method"].isin(ran)]
    metric_map = {"knn_top1": "knn20_top1", "linear_top1": "linear_top1"}
    rows = []
    for _, p in paper.iterrows():
        ours = cells[
            (cells["method"] == p["ours_method"]) & (cells["dataset"] == p["dataset"])
            & (cells["backbone"] == p["backbone"])
        ]
        metric = metric_map.get(p["metric"])
        if metric == "knn20_top1" and "k=200" in str(p["protocol"]):
            metric = "knn200_top1"
        row = {
            "paper method": p["method"], "dataset": p["dataset"], "backbone": p["backbone"],
            "paper epochs": p["epochs"], "metric": p["metric"], "paper": float(p["value"]),
            "paper protocol": p["protocol"], "source": p["source"], "verified": p["verified"],
        }
        if ours.empty or metric is None:
            row.update(ours="not run", difference=math.nan, our_protocol="")
        else:
            best = ours.iloc[0]
            row.update(
                ours=fmt_interval(best, metric),
                difference=float(best[f"{metric}_mean"]) - float(p["value"]),
                our_protocol=f"{best['protocol']} ({_OUR_PROTOCOL[metric]}; {best['epochs']} ep)",
            )
        rows.append(row)
    return pd.DataFrame(rows)


def problems_table(record_set: RecordSet) -> pd.DataFrame:
    return pd.DataFrame(
        [{"status": p.status, "run": p.run_dir, "detail": p.detail} for p in record_set.problems],
        columns=["status", "run", "detail"],
    )


# --------------------------------------------------------------------------------------------
# plots
# --------------------------------------------------------------------------------------------
def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def ablation_plots(ablations: dict[str, pd.DataFrame], metric: str = "knn20_top1") -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    for key, table in ablations.items():
        numeric = table[table["value"].map(_is_number)]
        if numeric.empty or numeric["value"].nunique() < 2:
            continue
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for label, series in numeric.groupby(["dataset", "method", "preset", "other settings"]):
            series = series.sort_values("value")
            x = series["value"].astype(float)
            if key == "method.topk_neg":
                x = x + 1  # group size n = one positive + k negatives
            mean = series[f"{metric}_mean"]
            err = np.vstack([mean - series[f"{metric}_ci_low"], series[f"{metric}_ci_high"] - mean])
            err = np.nan_to_num(err)
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=" ".join(map(str, label[:3])) + (f" {label[3]}" if label[3] else ""))
        ax.set_xlabel("group size n = 1 + k" if key == "method.topk_neg" else key)
        ax.set_ylabel(f"{metric} (%)")
        if key == "method.topk_neg":
            ax.set_xscale("log")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        name = "accuracy_vs_group_size.png" if key == "method.topk_neg" else f"ablation_{key.replace('.', '_')}.png"
        plots[name] = _png(fig)
        plt.close(fig)
    return plots


def knn_curve_plot(cells: pd.DataFrame) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    drawn = False
    for _, cell in cells.iterrows():
        curves = [r["metrics"].get("knn_curve") for r in cell["runs"]]
        curves = [c for c in curves if c]
        if not curves:
            continue
        ks = sorted({int(k) for c in curves for k in c})
        mean, err = [], []
        for k in ks:
            values = [c[str(k)] for c in curves if str(k) in c]
            s = t_interval(values)
            mean.append(s.mean)
            err.append(0.0 if math.isnan(s.half_width) else s.half_width)
        label = f"{cell['dataset']} {cell['method']}/{cell['preset']}" + (f" {cell['setting']}" if cell["setting"] else "")
        ax.errorbar(ks, mean, yerr=err, marker="o", capsize=2, label=label)
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_xlabel("k (T = 0.07)")
    ax.set_ylabel("k-NN top-1 (%)")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    data = _png(fig)
    plt.close(fig)
    return data


def loss_curve_plot(cells: pd.DataFrame) -> bytes | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    default_cells = cells[cells["setting"] == ""]
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
# assembly and rendering
# --------------------------------------------------------------------------------------------
def build_report(runs_dir: str | Path, plots: bool = True, paper_csv: Path = PAPER_CSV) -> Report:
    record_set = load_records(runs_dir)
    report = Report()
    cells = build_cells(record_set.records)
    report.notes["records"] = str(len(record_set.records))
    if not cells.empty:
        report.tables["main"] = main_table(cells)
        report.tables["deltas"] = deltas_table(cells)
        for key, table in ablation_tables(cells).items():
            report.tables[f"ablation:{key}"] = table
        report.tables["neighbour_agreement"] = agreement_table(cells)
        report.tables["paper_vs_reproduced"] = paper_table(cells, paper_csv)
    report.tables["problems"] = problems_table(record_set)
    if plots and not cells.empty:
        ablations = {k.split(":", 1)[1]: t for k, t in report.tables.items() if k.startswith("ablation:")}
        report.plots.update(ablation_plots(ablations))
        curve = knn_curve_plot(cells)
        if curve:
            report.plots["knn_vs_k.png"] = curve
        losses = loss_curve_plot(cells)
        if losses:
            report.plots["training_loss.png"] = losses
    return report


def _md(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _budget(row: pd.Series | dict[str, Any]) -> str:
    return f"{row['backbone']}, {row['epochs']} ep, batch {row['batch_size']}"


def render_markdown(report: Report, command: str = DEFAULT_COMMAND) -> str:
    out = [
        "# groupbench results",
        "",
        f"Generated by `{command}` from {report.notes.get('records', 0)} run records.",
        "",
        "**Protocol** (`groupbench-v1`, spec protocol.md): final checkpoint only; pooled backbone "
        "features under the deterministic eval transform; weighted k-NN on L2-normalised "
        "features, whole train split as the bank (k=20, T=0.07 headline; k=200, T=0.1); linear "
        "probe = multinomial logistic regression on standardised frozen features, λ chosen on a "
        "stratified 10% hold-out of the train split. Accuracies in % on the test split: mean ± "
        "95% Student-t half-width over n seeds. † n = 1: 95% percentile "
        f"{BOOTSTRAP_LABEL} (test-set sampling only, not training variance).",
        "",
    ]
    main = report.tables.get("main")
    if main is None or main.empty:
        out += ["No finished runs yet.", ""]
    else:
        out += ["## Main table", ""]
        header = ["dataset", "method", "preset", "budget", "setting", "protocol"]
        header += [label for _, label, _ in METRICS] + ["n", "seeds", "train s/run", "img/s"]
        rows = [
            [r["dataset"], r["method"], r["preset"], _budget(r), r["setting"] or "–", r["protocol"]]
            + [fmt_interval(r, m) for m, _, _ in METRICS]
            + [r["n"], r["seeds"], f"{r['train_seconds']:.0f}", f"{r['images_per_second']:.0f}"]
            for _, r in main.iterrows()
        ]
        out += [_md(header, rows), ""]
        out += _render_deltas(report.tables.get("deltas"))
        for name, table in report.tables.items():
            if name.startswith("ablation:"):
                out += _render_ablation(name.split(":", 1)[1], table, report.plots)
        out += _render_agreement(report.tables.get("neighbour_agreement"))
        out += _render_paper(report.tables.get("paper_vs_reproduced"))
        out += _render_plots(report.plots)
    problems = report.tables.get("problems")
    out += ["## Failed, unfinished or unreadable runs", ""]
    if problems is None or problems.empty:
        out += ["None.", ""]
    else:
        out += [_md(["status", "run", "detail"], problems.values.tolist()), ""]
    return "\n".join(out)


def _render_deltas(deltas: pd.DataFrame | None) -> list[str]:
    out = ["## Gain over each method's base (matched seeds)", ""]
    if deltas is None or deltas.empty:
        return out + ["No method with a base (spec README §3) has been run with it yet.", ""]
    n_comparisons = int((deltas["n_matched"] > 0).sum())
    out.append(
        "Δ = method − base per seed on the same data, budget, backbone and evaluation; mean Δ "
        "with its 95% t-interval and the two-sided paired t-test p-value (`scipy.stats."
        "ttest_rel`); with one matched seed a paired bootstrap over test images (no p-value). "
        f"{n_comparisons} comparisons, no multiple-comparison correction."
    )
    out.append("")
    header = ["dataset", "method", "base", "budget", "setting", "metric", "n", "per-seed Δ",
              "mean Δ [95% CI]", "p", "test", "unmatched seeds / note"]
    rows = []
    for _, r in deltas.iterrows():
        if r["n_matched"] == 0:
            interval, p = "–", "–"
        elif math.isnan(r["ci_low"]):
            interval, p = f"{r['mean_diff']:+.2f}", "–"
        else:
            interval = f"{r['mean_diff']:+.2f} [{r['ci_low']:+.2f}, {r['ci_high']:+.2f}]"
            p = fmt_p(r["p_value"]) if not math.isnan(r.get("p_value", math.nan)) else "–"
        note = "; ".join(x for x in (r.get("unmatched") or "", r.get("note") or "") if x)
        rows.append([
            r["dataset"], f"{r['method']}/{r['preset']}", r["base"], _budget(r), r["setting"] or "–",
            r["metric"], r["n_matched"], r.get("per_seed") or "–", interval, p, r.get("test") or "–",
            note or "–",
        ])
    return out + [_md(header, rows), ""]


def _render_ablation(key: str, table: pd.DataFrame, plots: dict[str, bytes]) -> list[str]:
    out = [f"## Ablation: `{key}`", ""]
    budgets = sorted({_budget(r) for _, r in table.iterrows()})
    out.append(f"Cells equal in everything but `{key}` and the seed; budget: {'; '.join(budgets)}.")
    out.append("")
    header = ["dataset", "method", "preset", key, "other settings"]
    header += [label for _, label, _ in METRICS] + ["n", "seeds"]
    rows = [
        [r["dataset"], r["method"], r["preset"], r["value"], r["other settings"] or "–"]
        + [fmt_interval(r, m) for m, _, _ in METRICS] + [r["n"], r["seeds"]]
        for _, r in table.iterrows()
    ]
    out += [_md(header, rows), ""]
    name = "accuracy_vs_group_size.png" if key == "method.topk_neg" else f"ablation_{key.replace('.', '_')}.png"
    if name in plots:
        out += [f"![{key}]({name})", ""]
    return out


def _render_agreement(table: pd.DataFrame | None) -> list[str]:
    if table is None or table.empty:
        return []
    out = [
        "## Local-neighbourhood consistency",
        "",
        "Per test image, the % of its k nearest train neighbours (cosine, pooled features) that "
        "share its label; mean ± 95% t half-width over seeds.",
        "",
    ]
    header = ["dataset", "method", "preset", "budget", "setting"] + [f"k={k}" for k in AGREEMENT_KS] + ["n"]
    rows = [
        [r["dataset"], r["method"], r["preset"], _budget(r), r["setting"] or "–"]
        + [fmt_interval(r, f"agree_k{k}") for k in AGREEMENT_KS] + [r["n"]]
        for _, r in table.iterrows()
    ]
    return out + [_md(header, rows), ""]


def _render_paper(table: pd.DataFrame | None) -> list[str]:
    out = ["## Paper vs reproduced", ""]
    if table is None or table.empty:
        return out + ["No published numbers for the methods run here.", ""]
    out.append(
        "Published numbers (`eval/paper_results.csv`, with their source and protocol) for the "
        "methods run here. `ours` is filled only where dataset and backbone match a cell of "
        "this report; the two protocols differ, so a difference is a pointer, not a verdict."
    )
    out.append("")
    header = ["paper method", "dataset", "backbone", "paper ep", "metric", "paper", "paper protocol",
              "ours", "our protocol", "Δ (ours − paper)", "source", "verified"]
    rows = []
    for _, r in table.iterrows():
        diff = "–" if math.isnan(r["difference"]) else f"{r['difference']:+.2f}"
        epochs = "–" if pd.isna(r["paper epochs"]) else r["paper epochs"]
        rows.append([
            r["paper method"], r["dataset"], r["backbone"], epochs, r["metric"], f"{r['paper']:.2f}",
            r["paper protocol"], r["ours"], r["our_protocol"] or "–", diff, r["source"], r["verified"],
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
    frames = [t.assign(table=name) for name, t in report.tables.items() if not t.empty]
    if not frames:
        return pd.DataFrame(columns=["table"])
    frame = pd.concat(frames, ignore_index=True, sort=False)
    return frame[["table", *[c for c in frame.columns if c != "table"]]]


def render(report: Report, fmt: str, command: str = DEFAULT_COMMAND) -> str:
    if fmt == "markdown":
        return render_markdown(report, command)
    if fmt == "csv":
        return tables_frame(report).to_csv(index=False)
    if fmt == "json":
        return json.dumps(
            {name: json.loads(t.to_json(orient="records")) for name, t in report.tables.items()},
            indent=2,
        ) + "\n"
    raise ValueError(f"unknown format {fmt!r}; valid: markdown, csv, json")


def write_plots(report: Report, plots_dir: str | Path) -> None:
    from engine.io import atomic_write_bytes

    for name, data in report.plots.items():
        atomic_write_bytes(Path(plots_dir) / name, data, hint="Choose a writable --plots-dir.")


def write_output(text: str, path: str | Path) -> None:
    """The rendered report, atomically: a report killed mid-write leaves the previous file whole
    (a shell redirect, ``> results/table.md``, truncates it before the report even starts)."""
    from engine.io import atomic_write_text

    atomic_write_text(path, text, hint="Choose a writable --output path.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="results/runs", help="directory of run records")
    parser.add_argument("--format", default="markdown", choices=["markdown", "csv", "json"])
    parser.add_argument(
        "--output", "-o", default=None,
        help="write the report to this file (atomically: temp file, fsync, rename) instead of "
             "stdout; the plots then default to its directory",
    )
    parser.add_argument(
        "--plots-dir", default=None,
        help="where the PNG plots are written (default: the --output file's directory, else "
             "results; the markdown links them by file name, so keep it the directory of the "
             "markdown file); 'none' skips them",
    )
    args = parser.parse_args(argv)
    if not Path(args.runs).exists():
        print(f"error: no run records: {args.runs} does not exist; run `python -m eval.grid -m` "
              "first or pass --runs DIR", file=sys.stderr)
        sys.exit(2)
    plots_dir = args.plots_dir
    if plots_dir is None:
        plots_dir = str(Path(args.output).parent) if args.output else "results"
    want_plots = plots_dir.lower() != "none" and args.format == "markdown"
    report = build_report(args.runs, plots=want_plots)
    if want_plots:
        try:
            write_plots(report, plots_dir)
        except OSError as exc:
            print(f"error: cannot write plots to {plots_dir}: {exc}", file=sys.stderr)
            sys.exit(2)
    command = DEFAULT_COMMAND if args.runs == "results/runs" else f"python -m eval.report --runs {args.runs}"
    if args.output:
        command = f"python -m eval.report --runs {args.runs} --output {args.output}"
    text = render(report, args.format, command)
    if args.output is None:
        sys.stdout.write(text)
        return
    try:
        write_output(text, args.output)
    except OSError as exc:
        print(f"error: cannot write the report to {args.output}: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
