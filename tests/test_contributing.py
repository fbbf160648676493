"""CONTRIBUTING.md's walk-through: a new method is one file, and nothing else has to change.

The toy method below is written to a temporary module (never into the repository), imported, and
run for one short epoch through the command line's entry point (``eval.grid.main``): its defaults
reach hydra from the dataclass alone (no preset YAML), the engine trains and evaluates it, and it
joins the default grid by itself.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

from tests.conftest import REPO

TOY_METHOD = '''
"""Toy contrastive method: NT-Xent on a linear projection of the pooled features."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods import register_method
from methods.base import SSLMethod, check_positive
from methods.simclr import nt_xent_loss


@dataclass
class ToyConfig:
    temperature: float = 0.5  # τ of the NT-Xent loss
    dim: int = 32  # output size of the linear projector


@register_method("toy_contrast")
class ToyContrast(SSLMethod):
    Config = ToyConfig
    base_presets = ("simclr",)
    optimizer_defaults = {"name": "sgd", "lr": 0.05, "weight_decay": 1.0e-4,
                          "schedule": "warmup_cosine", "warmup_epochs": 0}
    dataset_defaults = {"digits": {"dim": 16}}

    @classmethod
    def validate_config(cls, config: ToyConfig) -> None:
        check_positive("method.temperature", config.temperature)

    def __init__(self, backbone: torch.nn.Module, config: ToyConfig) -> None:
        super().__init__(backbone, config)
        self.projector = torch.nn.Linear(self.feature_dim, config.dim)

    def training_step(self, views, indices):
        z = [self.projector(self.backbone(v)) for v in views]
        return {"loss": nt_xent_loss(z, self.config.temperature)}
'''

RUN = '''
import json, sys
sys.path.insert(0, sys.argv[1])
import toy_method  # the new method's file: registering it is all it takes
from methods import default_grid_presets
from eval.grid import expand_sweep, main
jobs, _ = expand_sweep([])
print("GRID", json.dumps([job for job in jobs if "method=toy_contrast" in job]))
print("PRESETS", json.dumps(default_grid_presets()))
main(sys.argv[2:])
'''


def test_a_method_from_one_new_file_trains_one_epoch_through_the_cli(tmp_path):
    module_dir = tmp_path / "toy"
    module_dir.mkdir()
    (module_dir / "toy_method.py").write_text(textwrap.dedent(TOY_METHOD))
    assert not (REPO / "configs" / "method" / "toy_contrast.yaml").exists()
    args = [
        "method=toy_contrast", "dataset=digits", "trainer.epochs=1",
        "trainer.max_steps_per_epoch=2", "trainer.progress=false", "eval.linear=false",
        f"results_dir={tmp_path / 'results'}",
    ]
    result = subprocess.run(
        [sys.executable, "-c", RUN, str(module_dir), *args], cwd=REPO, capture_output=True,
        text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in result.stdout.splitlines()
             if line.startswith(("GRID ", "PRESETS "))}
    # the default grid picks it up, with its base preset, over the three seeds
    presets = json.loads(lines["PRESETS"])
    assert "toy_contrast" in presets and "simclr" in presets
    assert sorted(json.loads(lines["GRID"])) == [
        ["seed=0", "method=toy_contrast"], ["seed=1", "method=toy_contrast"],
        ["seed=2", "method=toy_contrast"],
    ]
    (path,) = (tmp_path / "results" / "runs" / "digits").rglob("record.json")
    record = json.loads(path.read_text())
    assert record["status"] == "finished"
    assert record["method"] == "toy_contrast" and record["preset"] == "default"
    method = record["config"]["method"]
    # defaults from the dataclass, the digits value from dataset_defaults, the optimiser's too
    assert method["temperature"] == 0.5 and method["dim"] == 16
    assert method["optimizer"]["lr"] == 0.05 and method["optimizer"]["name"] == "sgd"
    assert len(record["history"]) == 1 and math.isfinite(record["history"][0]["loss"])
    assert 10.0 < record["metrics"]["knn20_top1"] <= 100.0
