"""``python -m eval.report > results/table.md``: every run record, aggregated over seeds.

One row per cell: runs that agree on everything but the seed (same protocol, dataset, method,
preset, backbone, budget and hyperparameters). Cells are never merged, so records of different
protocols or budgets are never averaged together. Each accuracy is the mean over seeds ± the 95%
Student-t half-width (scipy), n seeds; a single seed gets a percentile bootstrap interval over
test images instead, labelled as such. pandas does the grouping.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import pandas as pd

from eval.records import RecordSet, cell_id, flatten, load_records, unpack_bits
from eval.stats import bootstrap_ci, t_interval

ROW_KEYS = ["dataset", "method", "preset", "backbone", "epochs", "batch_size"]
METRICS = [
    ("knn20_top1", "k-NN top-1 (k=20)", "knn20"),
    ("knn200_top1", "k-NN top-1 (k=200)", "knn200"),
    ("linear_top1", "linear top-1", "linear"),
    ("linear_top5", "linear top-5", None),
]
DEFAULT_COMMAND = "python -m eval.report > results/table.md"


def records_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    rows = []
    for record in records:
        row = {key: record.get(key) for key in ROW_KEYS}
        row.update(
            seed=record["seed"],
            protocol=record.get("protocol"),
            cell=cell_id(record),
            run_dir=record.get("run_dir"),
            train_seconds=record.get("train_seconds"),
            images_per_second=record.get("images_per_second"),
        )
        for metric, _, _ in METRICS:
            row[metric] = record["metrics"].get(metric)
        row["_record"] = record
        rows.append(row)
    return pd.DataFrame(rows)


def _varying_settings(group: pd.DataFrame, all_cells: pd.DataFrame) -> str:
    """The config keys that tell this cell apart from the other cells of the same row keys."""
    cells = all_cells.drop_duplicates("cell")
    if len(cells) <= 1:
        return ""
    flat = [flatten(r["config"]) for r in cells["_record"]]
    keys = sorted({k for f in flat for k in f} - {"seed"})
    varying = [k for k in keys if len({json.dumps(f.get(k), default=str) for f in flat}) > 1]
    mine = flatten(group["_record"].iloc[0]["config"])
    return ", ".join(f"{k}={mine.get(k)}" for k in varying)


def summarise(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per cell with mean, CI half-width (or bootstrap bounds), n and seeds per metric."""
    out = []
    for cell, group in frame.groupby("cell", sort=False):
        first = group.iloc[0]
        same_row = frame[(frame[ROW_KEYS] == first[ROW_KEYS]).all(axis=1)]
        row: dict[str, Any] = {key: first[key] for key in ROW_KEYS}
        row["protocol"] = first["protocol"]
        row["setting"] = _varying_settings(group, same_row)
        row["n"] = len(group)
        row["seeds"] = ",".join(str(s) for s in sorted(group["seed"]))
        row["cell"] = cell
        row["train_seconds"] = float(group["train_seconds"].mean())
        row["images_per_second"] = float(group["images_per_second"].mean())
        for metric, _, correct_key in METRICS:
            values = group[metric].dropna().astype(float).tolist()
            if not values:
                continue
            if len(values) >= 2:
                summary = t_interval(values)
                row[f"{metric}_mean"] = summary.mean
                row[f"{metric}_ci"] = summary.half_width
                row[f"{metric}_ci_kind"] = "t"
            else:
                row[f"{metric}_mean"] = values[0]
                record = group["_record"].iloc[0]
                packed = record.get("correct", {}).get(correct_key) if correct_key else None
                if packed is not None:
                    correct = unpack_bits(packed, record["metrics"]["n_test"])
                    _, low, high = bootstrap_ci(correct)
                    row[f"{metric}_low"], row[f"{metric}_high"] = low, high
                    row[f"{metric}_ci_kind"] = "bootstrap"
                else:
                    row[f"{metric}_ci_kind"] = "none"
        out.append(row)
    table = pd.DataFrame(out)
    if not table.empty:
        table = table.sort_values(["dataset", "method", "preset", "backbone", "epochs", "setting"])
    return table.reset_index(drop=True)


def format_cell(row: pd.Series, metric: str) -> str:
    mean = row.get(f"{metric}_mean")
    if mean is None or pd.isna(mean):
        return "–"
    kind = row.get(f"{metric}_ci_kind")
    if kind == "t":
        return f"{mean:.2f} ± {row[f'{metric}_ci']:.2f}"
    if kind == "bootstrap":
        return f"{mean:.2f} [{row[f'{metric}_low']:.2f}, {row[f'{metric}_high']:.2f}]†"
    return f"{mean:.2f}"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def render_markdown(table: pd.DataFrame, record_set: RecordSet, command: str) -> str:
    parts = [
        "# groupbench results",
        "",
        f"Generated by `{command}` from {len(record_set.records)} run records.",
        "",
        "Protocol (spec protocol.md): final checkpoint only; pooled backbone features of the "
        "deterministic eval transform; weighted k-NN on L2-normalised features (k=20, T=0.07 "
        "headline; k=200, T=0.1) with the whole train split as bank; linear probe = multinomial "
        "logistic regression on standardised frozen features, λ chosen on a stratified 10% "
        "hold-out of the train split. Accuracies in percent on the test split: mean ± 95% "
        "Student-t half-width over n seeds. † n = 1: 95% percentile bootstrap over test images "
        "(test-set sampling only, not training variance).",
        "",
    ]
    if table.empty:
        parts.append("No finished runs yet.")
    else:
        header = ["dataset", "method", "preset", "backbone", "epochs", "batch", "setting"]
        header += [label for _, label, _ in METRICS] + ["n", "seeds", "train s/run", "img/s"]
        rows = []
        for _, row in table.iterrows():
            cells = [
                row["dataset"], row["method"], row["preset"], row["backbone"], row["epochs"],
                row["batch_size"], row["setting"] or "–",
            ]
            cells += [format_cell(row, metric) for metric, _, _ in METRICS]
            cells += [
                row["n"], row["seeds"], f"{row['train_seconds']:.0f}",
                f"{row['images_per_second']:.0f}",
            ]
            rows.append(cells)
        protocols = sorted(set(table["protocol"]))
        parts.append(f"## Main table (protocol {', '.join(protocols)})")
        parts.append("")
        parts.append(markdown_table(header, rows))
    if record_set.problems:
        parts += ["", "## Failed, unfinished or unreadable runs", ""]
        parts.append(
            markdown_table(
                ["status", "run", "detail"],
                [[p.status, p.run_dir, p.detail.replace("|", "\\|")] for p in record_set.problems],
            )
        )
    return "\n".join(parts) + "\n"


def build_report(runs_dir: str | Path, fmt: str = "markdown", command: str = DEFAULT_COMMAND) -> str:
    record_set = load_records(runs_dir)
    frame = records_frame(record_set.records)
    table = summarise(frame) if not frame.empty else pd.DataFrame()
    if fmt == "markdown":
        return render_markdown(table, record_set, command)
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return table.to_json(orient="records", indent=2)
    raise ValueError(f"unknown format {fmt!r}; valid: markdown, csv, json")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n")[0])
    parser.add_argument("--runs", default="results/runs", help="directory of run records")
    parser.add_argument("--format", default="markdown", choices=["markdown", "csv", "json"])
    args = parser.parse_args(argv)
    if not Path(args.runs).exists():
        print(f"error: no run records: {args.runs} does not exist; run `python -m eval.grid -m` "
              "first or pass --runs DIR", file=sys.stderr)
        sys.exit(2)
    sys.stdout.write(build_report(args.runs, args.format))


if __name__ == "__main__":
    main()
