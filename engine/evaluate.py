"""Final-checkpoint evaluation (docs/protocol.md): frozen features once, then k-NN and the probe.

Features are pooled backbone outputs in ``eval()`` mode, float32, without gradients, for the train
split (bank / probe fit) and the test split, and are cached next to the checkpoint keyed by the
checkpoint's hash, so k-NN and the probe (and a re-run of the evaluation) read the same cache.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch

from datasets import DatasetBundle, ImageSplit
from engine.data import eval_batches
from engine.io import atomic_torch_save
from eval.knn import (
    agreement_from_neighbours,
    check_inputs,
    knn_from_neighbours,
    nearest_neighbours,
    resolve_k,
)
from eval.linear import linear_probe
from eval.records import pack_bits
from methods import SSLMethod

AGREEMENT_KS = (1, 5, 20, 50, 200)
# k-NN accuracy vs k for the report's curve, at the headline temperature (never used to pick k).
CURVE_KS = (1, 5, 10, 20, 50, 100, 200)
CURVE_TEMPERATURE = 0.07


@torch.inference_mode()
def extract_features(
    method: SSLMethod,
    split: ImageSplit,
    bundle: DatasetBundle,
    device: torch.device,
    batch_size: int = 512,
    num_workers: int = 4,
) -> torch.Tensor:
    """(N, d) float32 features of ``split`` under the eval transform, in split order."""
    was_training = method.training
    method.eval()
    try:
        parts = [
            method.embed(images).float()
            for images in eval_batches(split, bundle, batch_size, device, num_workers)
        ]
    finally:
        method.train(was_training)
    return torch.cat(parts)


def state_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for key in sorted(state):
        value = state[key]
        digest.update(key.encode())
        if isinstance(value, torch.Tensor):
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def cached_features(
    method: SSLMethod,
    bundle: DatasetBundle,
    device: torch.device,
    cache_dir: Path,
    batch_size: int = 512,
    num_workers: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and test features, read from ``cache_dir/features-<weights hash>.pt`` when present."""
    key = state_hash(method.backbone.state_dict())
    path = cache_dir / f"features-{key}.pt"
    if path.exists():
        try:
            cached = torch.load(path, map_location="cpu", weights_only=True)
            return cached["train"], cached["test"]
        except (RuntimeError, KeyError, EOFError, OSError):
            path.unlink(missing_ok=True)
    train = extract_features(method, bundle.train, bundle, device, batch_size, num_workers)
    test = extract_features(method, bundle.test, bundle, device, batch_size, num_workers)
    atomic_torch_save(path, {"train": train.cpu(), "test": test.cpu()})
    return train.cpu(), test.cpu()


def evaluate_features(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    knn_settings: list[dict[str, Any]],
    linear: bool = True,
    probe_backend: str = "torch",
    chunk_size: int = 1024,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Every metric of docs/protocol.md §3-§4 plus per-image correctness for the statistics of §5.
    Features that are not finite (a diverged network) raise ``ValueError``: no metric is made up
    from them."""
    check_inputs(train_features, train_labels, test_features, test_labels)
    if device is not None:
        train_features, test_features = train_features.to(device), test_features.to(device)
        train_labels, test_labels = train_labels.to(device), test_labels.to(device)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    n_train = len(train_features)
    metrics: dict[str, Any] = {}
    correct: dict[str, str] = {}
    # One similarity matmul and one top-k pass serve every k below: the canonical neighbour
    # lists of the largest k contain those of each smaller k as their first columns.
    settings = [(int(s["k"]), float(s["temperature"])) for s in knn_settings]
    ks_used = [resolve_k(k, n_train, clamp_k=True) for k, _ in settings]
    curve_ks = [k for k in CURVE_KS if k <= n_train]
    agreement_ks = [k for k in AGREEMENT_KS if k <= n_train]
    top_s, top_i = nearest_neighbours(
        train_features, test_features, max([*ks_used, *curve_ks, *agreement_ks]), chunk_size
    )
    for (k, temperature), k_used in zip(settings, ks_used, strict=True):
        result = knn_from_neighbours(
            top_s, top_i, train_labels, test_labels, k_used, temperature, num_classes
        )
        name = f"knn{k}"
        metrics[f"{name}_top1"] = result.top1
        metrics[f"{name}_top5"] = result.top5
        metrics[f"{name}_temperature"] = temperature
        if k_used != k:  # fewer bank entries than k: the record names the k actually used
            metrics[f"{name}_k_used"] = k_used
        correct[name] = pack_bits(result.correct)
    metrics["knn_curve"] = {
        str(k): knn_from_neighbours(
            top_s, top_i, train_labels, test_labels, k, CURVE_TEMPERATURE, num_classes
        ).top1
        for k in curve_ks
    }
    agreement = agreement_from_neighbours(top_i, train_labels, test_labels, agreement_ks)
    metrics["neighbour_agreement"] = {str(k): v for k, v in agreement.items()}
    if linear:
        probe = linear_probe(
            train_features, train_labels, test_features, test_labels, backend=probe_backend
        )
        metrics["linear_top1"] = probe.top1
        metrics["linear_top5"] = probe.top5
        metrics["linear_lambda"] = probe.chosen_lambda
        metrics["linear_lambda_at_edge"] = probe.lambda_at_edge
        # Every fit converged: the refit and each λ of the grid (a grid fit that stopped early
        # could have changed which λ was chosen).
        metrics["linear_converged"] = probe.converged and all(probe.holdout_converged.values())
        metrics["linear_iterations"] = dict(probe.iterations)
        metrics["linear_backend"] = probe.backend
        metrics["linear_holdout_stratified"] = probe.holdout_stratified
        correct["linear"] = pack_bits(probe.correct)
    metrics["n_test"] = len(test_labels)
    metrics["n_train"] = len(train_labels)
    return {"metrics": metrics, "correct": correct}
