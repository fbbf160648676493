"""``python -m eval.bench --write-readme``: the measured performance table of the README.

Everything is measured in one process, on this machine, as ratios where a ratio is the claim:
- augmentation images/s: our batched on-device pipeline vs torchvision's per-sample pipeline in a
  DataLoader with workers on the same cores (32 px CIFAR-style, 96 px STL-style; 2 views/image);
- loss forward+backward at B = 1024, D = 2048: NT-Xent, and GroCo per sorting back end and group
  size, as a ratio to NT-Xent (and group_sum vs diffsort);
- one training step per registered method (default preset on digits' backbone and batch) as a
  ratio to SimCLR's step;
- k-NN over a 50k bank and 10k queries (d = 512), and the linear probe on cached features;
- the default grid's wall time, from the records of ``python -m eval.grid -m`` (``wall_seconds``).

``--quick`` shrinks repetitions for a smoke check. The README section between the
``<!-- performance:start -->`` / ``<!-- performance:end -->`` markers is replaced atomically.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- performance:start -->", "<!-- performance:end -->"
COMMAND = "python -m eval.bench --write-readme"


def timeit(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


# --------------------------------------------------------------------------------------------
# augmentation
# --------------------------------------------------------------------------------------------
class _TorchvisionTwoViews(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, size: int, transform) -> None:
        self.images = images
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        image = self.images[index]
        return self.transform(image), self.transform(image)


def torchvision_pipeline(cfg):
    """torchvision v2 per-sample equivalent of one ``ViewConfig`` (uint8 tensor input)."""
    from torchvision.transforms import v2

    ops = [
        v2.RandomResizedCrop(cfg.size, scale=cfg.crop_scale, ratio=cfg.crop_ratio, antialias=True),
        v2.RandomHorizontalFlip(cfg.flip_p),
        v2.RandomApply(
            [v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)], p=cfg.jitter_p
        ),
        v2.RandomGrayscale(cfg.grayscale_p),
    ]
    if cfg.blur_p > 0:
        ops.append(v2.RandomApply([v2.GaussianBlur(cfg.blur_kernel, cfg.blur_sigma)], p=cfg.blur_p))
    ops += [v2.ToDtype(torch.float32, scale=True)]
    return v2.Compose(ops)


def _augmentation_row(dataset: str, size: int, quick: bool, workers: int) -> dict[str, Any]:
    from datasets.views import MultiViewAugment, view_config

    n = 512 if quick or size > 32 else 2048
    batch = 256
    images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    cfg = view_config(dataset, "shared", size)
    ours = MultiViewAugment([cfg, cfg], (0.5,) * 3, (0.25,) * 3)
    generator = torch.Generator().manual_seed(0)

    def run_ours() -> None:
        for start in range(0, n, batch):
            ours(images[start : start + batch], generator=generator)

    per_sample = _TorchvisionTwoViews(images, size, torchvision_pipeline(cfg))

    def run_torchvision() -> None:
        loader = torch.utils.data.DataLoader(
            per_sample, batch_size=batch, num_workers=workers, persistent_workers=False
        )
        for _ in loader:
            pass

    ours_s = timeit(run_ours, 1 if quick else 3)
    tv_s = timeit(run_torchvision, 1, warmup=0 if quick else 1)
    return {"size": size, "ours": n / ours_s, "torchvision": n / tv_s, "ratio": tv_s / ours_s,
            "workers": workers}


def bench_augmentation(quick: bool) -> list[dict[str, Any]]:
    workers = min(2, os.cpu_count() or 1)
    return [_augmentation_row(d, s, quick, workers) for d, s in (("cifar10", 32), ("stl10", 96))]


# --------------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------------
def bench_losses(quick: bool) -> list[dict[str, Any]]:
    from methods.simclr import nt_xent_loss

    batch, dim = 1024, 2048
    generator = torch.Generator().manual_seed(0)
    views = [torch.randn(batch, dim, generator=generator, requires_grad=True) for _ in range(2)]
    repeats = 2 if quick else 5

    def step(loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            for v in views:
                v.grad = None
            loss_fn().backward()

        return run

    base = timeit(step(lambda: nt_xent_loss(views, 0.2)), repeats)
    rows = [{"loss": "NT-Xent", "n": "–", "backend": "–", "seconds": base, "ratio": 1.0}]
    try:
        from methods.groco import groco_loss
    except ImportError:
        return rows
    sizes = (11, 51) if quick else (11, 51, 128, 256)
    for n in sizes:
        for backend in ("group_sum", "columns", "diffsort"):
            if backend != "group_sum" and n > 51:
                continue  # P-forming back ends keep O(n^2) per row and layer: many GiB here
            fn = step(lambda n=n, backend=backend: groco_loss(views, topk_neg=n - 1, backend=backend))
            seconds = timeit(fn, 1 if backend != "group_sum" else repeats)
            rows.append({"loss": "GroCo", "n": n, "backend": backend, "seconds": seconds,
                         "ratio": seconds / base})
    return rows


_PEAK_SCRIPT = """
import time, torch
from methods.sorting import rank_mass

def status_kib(field):  # VmHWM is this process image's own peak (ru_maxrss inherits the parent's)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))

torch.set_num_threads({threads})
g = torch.Generator().manual_seed(0)
x = torch.randn({rows}, {n}, generator=g).mul_(0.3).requires_grad_()
ranks = torch.arange({n}) >= {n} - 1
rank_mass(x[:2].detach(), ranks, network="{network}")  # plan and imports before the baseline
before = status_kib("VmRSS:")
start = time.perf_counter()
q = rank_mass(x, ranks, network="{network}")
torch.nn.functional.binary_cross_entropy(q.clamp(0, 1), ranks.float().expand_as(q)).backward()
seconds = time.perf_counter() - start
print(seconds, (status_kib("VmHWM:") - before) * 1024)
"""


def bench_large_groups(quick: bool) -> list[dict[str, Any]]:
    """GroCo's sorter at group size n = 512 on B = 256 rows (``rank_mass``, group_sum, one
    positive rank), forward + backward of the BCE, per network: time and an upper bound of the
    peak memory it adds (a fresh process's lifetime resident-set high-water mark minus its
    resident set right before the call; import-time peaks can only inflate it)."""
    import subprocess

    rows = []
    for network in ("odd_even", "bitonic"):
        script = _PEAK_SCRIPT.format(threads=torch.get_num_threads(), rows=256, n=512,
                                     network=network)
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent)
        if out.returncode != 0:
            raise RuntimeError(f"n=512 {network} benchmark failed:\n{out.stderr[-2000:]}")
        seconds, peak = out.stdout.split()
        rows.append({"network": network, "n": 512, "batch": 256, "seconds": float(seconds),
                     "peak_bytes": int(peak)})
    return rows


# --------------------------------------------------------------------------------------------
# training steps
# --------------------------------------------------------------------------------------------
def method_step(name: str) -> Callable[[], None]:
    """One training step of method ``name`` (default preset, resolved for digits: its backbone,
    batch of 256 and views): forward, backward and the per-step state update."""
    from hydra import compose, initialize_config_dir

    import datasets
    from backbones import build_backbone
    from datasets.views import MultiViewAugment, view_config
    from engine.config import method_options, resolve_run_config
    from methods import build_method

    config_dir = str(Path(__file__).resolve().parent.parent / "configs")
    bundle = datasets.load_dataset("digits")
    images = bundle.pretrain.images[:256]
    with initialize_config_dir(config_dir=config_dir, version_base="1.3"):
        cfg = resolve_run_config(compose("config", overrides=[f"method={name}"]))
    torch.manual_seed(0)
    backbone = build_backbone(cfg["backbone"]["name"], in_chans=1, stem=cfg["backbone"]["stem"],
                              image_size=16)
    method = build_method(name, backbone, **method_options(cfg["method"]))
    augment = MultiViewAugment(
        [view_config("digits", k, 16) for k in method.view_kinds()], bundle.mean, bundle.std
    )
    views = augment(images, generator=torch.Generator().manual_seed(0))
    indices = torch.arange(len(images))
    method.train()

    def step() -> None:
        method.zero_grad(set_to_none=True)
        method.training_step(views, indices)["loss"].backward()
        method.after_optimizer_step(0, 100)

    return step


def bench_train_steps(quick: bool) -> list[dict[str, Any]]:
    from methods import list_methods

    rows = [{"method": name, "seconds": timeit(method_step(name), 2 if quick else 5)}
            for name in list_methods()]
    simclr = next(r["seconds"] for r in rows if r["method"] == "simclr")
    for row in rows:
        row["ratio"] = row["seconds"] / simclr
    return rows


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
def bench_eval(quick: bool) -> list[dict[str, Any]]:
    from eval.knn import knn_evaluate
    from eval.linear import linear_probe

    generator = torch.Generator().manual_seed(0)
    n_bank, n_query, dim, classes = (10000, 2000, 512, 100) if quick else (50000, 10000, 512, 100)
    bank = torch.randn(n_bank, dim, generator=generator)
    queries = torch.randn(n_query, dim, generator=generator)
    y_bank = torch.randint(0, classes, (n_bank,), generator=generator)
    y_query = torch.randint(0, classes, (n_query,), generator=generator)
    rows = []
    for k, t in ((20, 0.07), (200, 0.1)):
        seconds = timeit(lambda k=k, t=t: knn_evaluate(bank, y_bank, queries, y_query, k=k,
                                                       temperature=t), 1, warmup=0)
        rows.append({"what": f"k-NN k={k}, {n_bank:,} bank × {n_query:,} queries, d={dim}",
                     "seconds": seconds})
    # the probe on a digits-size cache (what the default grid evaluates)
    centers = torch.randn(10, 96, generator=generator) * 2
    y_train = torch.randint(0, 10, (1437,), generator=generator)
    y_test = torch.randint(0, 10, (360,), generator=generator)
    x_train = centers[y_train] + torch.randn(1437, 96, generator=generator)
    x_test = centers[y_test] + torch.randn(360, 96, generator=generator)
    seconds = timeit(lambda: linear_probe(x_train, y_train, x_test, y_test), 1)
    rows.append({"what": "linear probe (7 λ + refit), 1,437 × 96, 10 classes", "seconds": seconds})
    return rows


def grid_wall_time(runs_dir: Path) -> dict[str, Any] | None:
    """Sum of the per-run wall times (records' ``wall_seconds``) of the default grid's runs, i.e.
    of exactly the jobs ``python -m eval.grid -m`` launches, found by their run directories under
    ``runs_dir``; ablation runs in the same directory are not counted."""
    from hydra import compose, initialize_config_dir

    from engine.config import resolve_run_config
    from engine.train import run_dir_for
    from eval.grid import CONFIG_DIR, expand_sweep

    jobs, _ = expand_sweep([])
    records = []
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for job in jobs:
            config = resolve_run_config(compose("config", overrides=job))
            config["results_dir"] = str(runs_dir.parent)
            path = run_dir_for(config) / "record.json"
            if path.exists():
                record = json.loads(path.read_text())
                if record.get("status") == "finished":
                    records.append(record)
    if not records:
        return None
    per_method: dict[str, list[float]] = {}
    for r in records:
        key = f"{r['method']}/{r['preset']}"
        per_method.setdefault(key, []).append(r.get("wall_seconds", r["train_seconds"] + r["eval_seconds"]))
    total = sum(sum(v) for v in per_method.values())
    return {"runs": len(records), "jobs": len(jobs), "seconds": total, "per_method": per_method}


# --------------------------------------------------------------------------------------------
# README
# --------------------------------------------------------------------------------------------
def render(results: dict[str, Any]) -> str:
    lines = [
        f"Measured by `{COMMAND}` on {results['machine']}. Times are medians of repeated runs; "
        "the claims are the ratios.",
        "",
    ]
    if results.get("augmentation"):
        lines += ["**Augmentation** (SimCLR two views per image, `shared` family):", "",
                  "| size | ours (batched, on device) img/s | torchvision per-sample + DataLoader img/s | speed-up |",
                  "|---|---|---|---|"]
        for r in results["augmentation"]:
            lines.append(f"| {r['size']} px | {r['ours']:.0f} | {r['torchvision']:.0f} "
                         f"({r['workers']} workers) | {r['ratio']:.1f}× |")
        lines.append("")
    if results.get("losses"):
        lines += ["**Loss forward+backward**, B = 1024, D = 2048 (GroCo group size n = 1 + k):", "",
                  "| loss | n | back end | ms | × NT-Xent |", "|---|---|---|---|---|"]
        for r in results["losses"]:
            lines.append(f"| {r['loss']} | {r['n']} | {r['backend']} | {1000 * r['seconds']:.0f} | {r['ratio']:.2f} |")
        lines.append("")
    if results.get("large"):
        lines += ["**GroCo's sorter at group size n = 512**, B = 256 rows, `group_sum`, forward + "
                  "backward (peak memory it adds to a fresh process, an upper bound):", "",
                  "| network | s | peak MiB |", "|---|---|---|"]
        for r in results["large"]:
            lines.append(f"| {r['network']} | {r['seconds']:.2f} | {r['peak_bytes'] / 2**20:.0f} |")
        lines.append("")
    if results.get("steps"):
        lines += ["**One training step** (default preset, digits: `test_resnet`, batch 256, forward+backward):", "",
                  "| method | ms | × SimCLR |", "|---|---|---|"]
        for r in results["steps"]:
            lines.append(f"| {r['method']} | {1000 * r['seconds']:.0f} | {r['ratio']:.2f} |")
        lines.append("")
    if results.get("eval"):
        lines += ["**Evaluation** (CPU):", "", "| what | s |", "|---|---|"]
        for r in results["eval"]:
            lines.append(f"| {r['what']} | {r['seconds']:.2f} |")
        lines.append("")
    grid = results.get("grid")
    if grid:
        lines += [f"**Default grid** (`python -m eval.grid -m`): {grid['runs']} of its {grid['jobs']} runs "
                  f"recorded, {grid['seconds'] / 60:.1f} min of run wall time in all (records' "
                  "`wall_seconds`, one run after another in one process); per preset, mean s per run:", "",
                  "| method/preset | runs | s per run |", "|---|---|---|"]
        for key, values in sorted(grid["per_method"].items()):
            lines.append(f"| {key} | {len(values)} | {sum(values) / len(values):.0f} |")
        lines.append("")
    checks = targets(results)
    if checks:
        lines += ["**Targets**:", "", "| target | measured | met |", "|---|---|---|"]
        for what, measured, met in checks:
            lines.append(f"| {what} | {measured} | {'yes' if met else '**no**'} |")
        lines.append("")
    return "\n".join(lines)


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool]]:
    """Each performance target the project states, with the measured value and whether it holds."""
    out: list[tuple[str, str, bool]] = []
    aug = {r["size"]: r for r in results.get("augmentation") or []}
    if 32 in aug:
        ratio = aug[32]["ratio"]
        out.append(("augmentation at 32 px ≥ 5× torchvision per-sample", f"{ratio:.1f}×", ratio >= 5))
    losses = {(r["n"], r["backend"]): r for r in results.get("losses") or [] if r["loss"] == "GroCo"}
    if (51, "group_sum") in losses and (51, "diffsort") in losses:
        speedup = losses[(51, "diffsort")]["seconds"] / losses[(51, "group_sum")]["seconds"]
        out.append(("GroCo n = 51: group_sum ≥ 20× faster than diffsort", f"{speedup:.1f}×",
                    speedup >= 20))
    if (51, "group_sum") in losses:
        ratio = losses[(51, "group_sum")]["ratio"]
        out.append(("GroCo n = 51 (group_sum) ≤ 2× NT-Xent", f"{ratio:.2f}×", ratio <= 2))
    if (11, "group_sum") in losses:
        ratio = losses[(11, "group_sum")]["ratio"]
        out.append(("GroCo n = 11 (group_sum) ≤ 1.2× NT-Xent", f"{ratio:.2f}×", ratio <= 1.2))
    for r in results.get("large") or []:
        mib = r["peak_bytes"] / 2**20
        out.append((f"GroCo n = 512, B = 256, {r['network']}: peak memory < 1 GiB", f"{mib:.0f} MiB",
                    r["peak_bytes"] < 2**30))
    for r in results.get("steps") or []:
        if r["method"] == "simclr":
            continue
        limit = 1.5 if r["method"] == "all4one" else 1.25
        out.append((f"{r['method']} training step ≤ {limit}× SimCLR", f"{r['ratio']:.2f}×",
                    r["ratio"] <= limit))
    for r in results.get("eval") or []:
        if r["what"].startswith("k-NN k=200, 50,000"):
            out.append(("k-NN 50k bank × 10k queries ≤ 20 s", f"{r['seconds']:.1f} s", r["seconds"] <= 20))
    grid = results.get("grid")
    if grid:
        minutes = grid["seconds"] / 60
        out.append((f"default grid ({grid['runs']} runs) ≤ 10 min", f"{minutes:.1f} min", minutes <= 10))
    return out


def write_readme(section: str, readme: Path = README) -> None:
    from engine.io import atomic_write_text

    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"error: {readme} has no {START} … {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    atomic_write_text(readme, f"{head}{START}\n{section}\n{END}{tail}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions, smaller inputs")
    parser.add_argument("--write-readme", action="store_true", help="replace the README section")
    parser.add_argument("--only", nargs="*", default=None,
                        choices=["augmentation", "losses", "large", "steps", "eval", "grid"])
    parser.add_argument("--runs", default="results/runs", help="records of the default grid")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    want = set(args.only or ["augmentation", "losses", "large", "steps", "eval", "grid"])
    results: dict[str, Any] = {
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}",
    }
    for name, fn in (("augmentation", bench_augmentation), ("losses", bench_losses),
                     ("large", bench_large_groups),
                     ("steps", bench_train_steps), ("eval", bench_eval)):
        if name in want:
            print(f"[bench] {name} …", file=sys.stderr)
            results[name] = fn(args.quick)
    if "grid" in want:
        results["grid"] = grid_wall_time(Path(args.runs))
    section = render(results)
    print(section)
    if args.write_readme:
        write_readme(section)


if __name__ == "__main__":
    main()
