"""Registry, class attributes and hooks, reference rows, presets, SimCLR's NT-Xent and MoCo's
queue / momentum semantics."""

from __future__ import annotations

import copy
import dataclasses
import math
import re

import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from torch import nn

import methods
from engine.config import ConfigError, method_options, resolve_run_config
from engine.optim import OptimizerSettings
from methods import (
    MethodConfigError,
    SSLMethod,
    build_method,
    default_grid_presets,
    get_method_class,
    list_methods,
)
from methods.blocks import FeatureQueue, MomentumEncoder, multi_positive_infonce
from methods.groco import GroCoConfig
from methods.moco import moco_infonce_loss
from methods.presets import method_defaults
from methods.simclr import nt_xent_loss
from tests.conftest import REPO, compose_config
from tests.tiny import TinyBackbone


# ---------------------------------------------------------------------------------- registry
def test_registry_lists_and_builds():
    assert {"simclr", "moco"} <= set(list_methods())
    assert list_methods() == sorted(list_methods())
    method = build_method("simclr", TinyBackbone(), temperature=0.5)
    assert method.name == "simclr" and method.config.temperature == 0.5


def test_unknown_method_lists_valid_names():
    with pytest.raises(MethodConfigError) as err:
        build_method("simclrr", TinyBackbone())
    assert "simclrr" in str(err.value)
    for name in list_methods():
        assert name in str(err.value)


def test_unknown_option_lists_valid_options():
    with pytest.raises(MethodConfigError) as err:
        build_method("moco", TinyBackbone(), queue_sise=16)
    assert "queue_sise" in str(err.value) and "queue_size" in str(err.value)


def test_invalid_choice_names_value_and_choices():
    with pytest.raises(MethodConfigError) as err:
        build_method("simclr", TinyBackbone(), multiview="pairs")
    assert "pairs" in str(err.value) and "sum_in_log" in str(err.value)


def test_register_rejects_duplicate_names():
    with pytest.raises(ValueError, match="already registered"):

        @methods.register_method("simclr")
        class Other(methods.SSLMethod):
            def training_step(self, views, indices):
                return {}


def test_embed_is_pooled_backbone_output():
    backbone = TinyBackbone()
    method = build_method("moco", backbone, queue_size=8).eval()
    x = torch.randn(4, 3, 4, 4)
    assert torch.equal(method.embed(x), backbone(x))
    assert method.embed(x).shape == (4, backbone.num_features)


# ------------------------------------------------------- class attributes, hooks, references
TRAINING = list_methods(trains=True)
REFERENCES = list_methods(trains=False)
PRESET_DIR = REPO / "configs" / "method"
DATASETS = sorted(p.stem for p in (REPO / "configs" / "dataset").glob("*.yaml"))


def test_reference_rows_are_registered_and_not_trained():
    assert REFERENCES == ["pixels", "random_init"]
    assert len(TRAINING) == len(list_methods()) - 2 >= 7
    for name in list_methods():
        cls = get_method_class(name)
        assert cls.is_reference == (name in REFERENCES) and cls.trains == (name in TRAINING)
        assert cls.default_preset and (not cls.is_reference or cls.paper_aliases == ())


def test_default_grid_presets_come_from_the_registry():
    presets = default_grid_presets()
    assert presets[:2] == ["pixels", "random_init"]  # the references first
    assert len(presets) == len(set(presets))
    expected = {p for n in list_methods() for p in (get_method_class(n).default_preset,
                                                    *get_method_class(n).base_presets)}
    assert set(presets) == expected
    assert len(presets) == len(list_methods()) + 3  # + moco_ascl_base, moco_cld_base, simclr_groco_baseline


def test_base_presets_are_the_default_presets_base():
    for name in TRAINING:
        cls = get_method_class(name)
        default = compose_config([f"method={cls.default_preset}"]).method
        assert default.name == name
        bases = set()
        for preset in cls.base_presets:
            base = compose_config([f"method={preset}"]).method
            assert base.name in list_methods() and base.name != name
            bases.add(f"{base.name}/{base.preset}")
        assert (default.base is None) == (not bases)
        assert default.base is None or default.base in bases


def test_paper_aliases_name_rows_of_the_paper_table():
    rows = {line.split(",", 1)[0] for line in (REPO / "eval" / "paper_results.csv").read_text()
            .splitlines()[1:]}
    tokens = {token for row in rows for token in re.split(r"[\s(+;)]+", row.lower()) if token}
    matched = 0
    for name in TRAINING:
        aliases = get_method_class(name).paper_aliases
        assert name in aliases and set(aliases) - {name} <= tokens, name
        matched += bool(set(aliases) & tokens)
    assert matched >= len(TRAINING) - 1  # ASCL's papers report no number the table holds
    assert get_method_class("moco").paper_aliases == ("moco", "mocov2", "mocov2plus")


def _restated(node, preset, where=""):
    """Keys of a preset YAML whose value equals what the defaults node already holds."""
    out = []
    for key, value in preset.items():
        if isinstance(value, dict) and isinstance(node.get(key), dict):
            out += _restated(node[key], value, f"{where}{key}.")
        elif key in node and node[key] == value:
            out.append(f"{where}{key}")
    return out


def test_preset_yamls_state_only_what_differs_from_the_dataclass():
    for path in sorted(PRESET_DIR.glob("*.yaml")):
        text = yaml.safe_load(path.read_text())
        (entry,) = [e for e in text.pop("defaults") if e != "_self_"]
        name = entry.removeprefix("/method_defaults/").removesuffix("@_here_")
        node = method_defaults(get_method_class(name))
        assert _restated(node, text) == [], path.name
        assert set(text) <= set(node), path.name
        # the dataclass holds every default once: the YAML never states an option's default
        if get_method_class(name).default_preset == path.stem:
            assert set(text) <= {"base"}, path.name


def test_every_preset_composes_to_the_dataclass_fields_and_resolves_on_every_dataset(tmp_path):
    for preset in default_grid_presets():
        method = OmegaConf.to_container(compose_config([f"method={preset}"]).method)
        cls = get_method_class(method["name"])
        fields = {f.name for f in dataclasses.fields(cls.Config)} - {"preset"}
        assert set(method) == {"name", "preset", "base", "optimizer", "auto"} | fields, preset
        per_dataset = {k for entry in method["auto"].values() for k in entry}
        for dataset in DATASETS:
            config = resolve_run_config(compose_config(
                [f"method={preset}", f"dataset={dataset}", f"results_dir={tmp_path}"]))
            resolved = config["method"]
            assert "auto" not in resolved
            assert all(resolved[k] is not None for k in per_dataset if k != "optimizer"), preset
            assert all(v is not None for v in resolved["optimizer"].values()), preset


def test_groco_takes_the_official_values_of_its_training_length(tmp_path):
    def optimizer(*overrides):
        cfg = compose_config(["method=groco", f"results_dir={tmp_path}", *overrides])
        resolved = resolve_run_config(cfg)["method"]["optimizer"]
        return resolved["lr"], resolved["warmup_epochs"], resolved["weight_decay"]

    assert compose_config(["method=groco"]).method.optimizer.lr is None  # set by the length
    assert optimizer() == (0.75, 1, 1e-6)  # digits: 30 epochs (6.0 at B = 256)
    assert optimizer("trainer.epochs=100") == (0.75, 1, 1e-6)
    assert optimizer("method.multicrop=true") == (0.75, 10, 1e-6)
    assert optimizer("dataset=cifar10") == (0.375, 10, 1e-6)  # 200 epochs
    assert optimizer("trainer.epochs=101") == (0.375, 10, 1e-6)
    assert optimizer("dataset=imagenet100") == (0.375, 10, 1e-6)  # 400 epochs
    assert optimizer("trainer.epochs=799", "method.views=4") == (0.375, 10, 2e-6)
    assert optimizer("trainer.epochs=200", "method.multicrop=true") == (0.375, 10, 2e-6)
    assert optimizer("trainer.epochs=100", "method.views=4") == (0.75, 1, 1e-6)
    assert optimizer("trainer.epochs=800") == (0.1875, 10, 1e-6)
    assert optimizer("trainer.epochs=1000", "method.optimizer.lr=0.3",
                     "method.optimizer.warmup_epochs=2") == (0.3, 2, 1e-6)  # the user's values
    cfg = compose_config(["method=groco", f"results_dir={tmp_path}", "trainer.epochs=200"])
    resolved = resolve_run_config(cfg)
    assert OptimizerSettings.from_dict(resolved["method"]["optimizer"]).peak_lr(256) == 3.0


# augment=official: each trained preset's published views (docs/recipes.md §3)
CLD_OFFICIAL = {"cifar10": ["mocov2_erase"] * 3, "cifar100": ["cld_basic"] * 3,
                "imagenet100": ["mocov2"] * 3}
OFFICIAL_VIEWS = {
    "simclr": ["simclr"] * 2, "simclr_groco_baseline": ["simclr"] * 2,
    "nnclr": ["byol1", "byol2"], "all4one": ["byol1", "byol2"],
    "moco": ["mocov2"] * 2, "moco_ascl_base": ["mocov2", "weak"], "ascl": ["mocov2", "weak"],
    "moco_cld_base": CLD_OFFICIAL, "cld": CLD_OFFICIAL, "groco": ["global1", "global2"],
}


def test_augment_official_gives_each_method_its_published_views(tmp_path):
    trained = [p for p in default_grid_presets()
               if get_method_class(compose_config([f"method={p}"]).method.name).trains]
    assert sorted(OFFICIAL_VIEWS) == sorted(trained)
    for preset, views in OFFICIAL_VIEWS.items():
        for dataset in ("cifar10", "cifar100", "imagenet100"):
            config = resolve_run_config(compose_config(
                [f"method={preset}", f"dataset={dataset}", f"results_dir={tmp_path}",
                 "augment=official"]))
            method = build_method(config["method"]["name"], TinyBackbone(),
                                  **method_options(config["method"]))
            want = views[dataset] if isinstance(views, dict) else views
            assert method.augmentation_kinds("official", dataset) == want, (preset, dataset)
            assert method.augmentation_kinds("shared", dataset) == method.view_kinds()
    groco = build_method("groco", TinyBackbone(), views=3)
    assert groco.augmentation_kinds("official", "cifar10") == ["global1", "global2", "global1"]
    # a trained method without a published pipeline refuses it rather than train on shared views
    with pytest.raises(MethodConfigError, match="simclr has no published pipeline.*augment=shared"):
        SSLMethod.official_view_kinds(build_method("simclr", TinyBackbone()), "cifar10")


def test_augment_is_shared_or_official_and_official_needs_colour_images(tmp_path):
    with pytest.raises(ConfigError, match="invalid augment='strong'; valid values: shared, official"):
        resolve_run_config(compose_config([f"results_dir={tmp_path}", "augment=strong"]))
    with pytest.raises(ConfigError, match=r"augment=official with dataset=digits.*cifar10"):
        resolve_run_config(compose_config([f"results_dir={tmp_path}", "augment=official"]))


def test_the_default_augment_leaves_run_keys_and_cells_as_before(tmp_path):
    """augment came after runs existed: at its default it is left out of the run hash and the
    cell, so an earlier run keeps its directory; `official` is another run."""
    from eval.records import cell_id, run_hash

    config = resolve_run_config(compose_config([f"results_dir={tmp_path}", "dataset=cifar10"]))
    before = copy.deepcopy(config)
    del before["augment"]
    official = {**copy.deepcopy(config), "augment": "official"}
    assert run_hash(config) == run_hash(before) != run_hash(official)
    record = {"protocol": "groupbench-v1", "config": config}
    assert cell_id(record) == cell_id({**record, "config": before}) != cell_id(
        {**record, "config": official})


def test_dataset_defaults_resolve_per_dataset(tmp_path):
    def resolved(preset, dataset):
        cfg = compose_config([f"method={preset}", f"dataset={dataset}", f"results_dir={tmp_path}"])
        return resolve_run_config(cfg)["method"]

    assert [resolved("moco", d)["queue_size"] for d in ("digits", "cifar10", "imagenet100")] == [
        1024, 4096, 65536]
    cld = resolved("cld", "imagenet100")
    assert (cld["head"], cld["clusters"], cld["optimizer"]["lr"]) == ("normmlp", 120, 0.2)
    cifar100 = resolved("cld", "cifar100")
    assert (cifar100["queue_size"], cifar100["cld_lambda"], cifar100["cld_t"]) == (4096, 0.25, 0.2)
    assert cifar100["optimizer"]["weight_decay"] == 7.0e-4
    base = resolved("moco_cld_base", "imagenet100")
    assert (base["head"], base["temperature"], base["views"]) == ("mlp", 0.2, 3)
    simclr = resolved("simclr_groco_baseline", "imagenet100")  # fixed on every dataset
    assert (simclr["proj_hidden_dim"], simclr["proj_output_dim"]) == (2048, 128)
    assert resolved("simclr", "imagenet100")["proj_hidden_dim"] == 4096
    # the method's defaults, when nothing depends on the dataset
    assert resolved("groco", "cifar10")["topk_neg"] == GroCoConfig().topk_neg == 10


def test_overrides_keep_their_type_and_unknown_options_are_refused():
    from hydra.errors import ConfigCompositionException

    cfg = compose_config(["method=groco", "method.sorter.steepness=1", "method.topk_neg=20"])
    assert cfg.method.sorter.steepness == 1 and isinstance(cfg.method.sorter.steepness, int)
    with pytest.raises(ConfigCompositionException, match="temprature"):
        compose_config(["method=simclr", "method.temprature=0.1"])
    with pytest.raises(MethodConfigError, match=r"method.temperature='abc'; it must be a number"):
        build_method("simclr", TinyBackbone(), temperature="abc")


def test_dataset_defaults_must_name_options():
    @dataclasses.dataclass
    class BrokenConfig:
        queue_size: int = 8

    class Broken(methods.SSLMethod):
        Config = BrokenConfig
        dataset_defaults = {"digits": {"queue_sise": 16}}

        def training_step(self, views, indices):
            return {}

    with pytest.raises(TypeError, match="names 'queue_sise', which is not an option; valid: "):
        methods.register_method("broken_dataset_defaults")(Broken)
    assert "broken_dataset_defaults" not in list_methods()


def test_engine_hooks():
    moco = build_method("moco", TinyBackbone(), queue_size=8)
    assert moco.updates_ema_in_training_step() and moco.uses_shuffle_bn()
    assert moco.local_bn_modules() == [moco.key_encoder]
    late = build_method("moco", TinyBackbone(), queue_size=8, ema_timing="after_step")
    assert not late.updates_ema_in_training_step()
    ascl = build_method("ascl", TinyBackbone(), queue_size=8, bn_splits=1, shuffle_bn=False)
    assert ascl.updates_ema_in_training_step() and not ascl.uses_shuffle_bn()
    assert ascl.local_bn_modules() == []
    cld = build_method("cld", TinyBackbone(), queue_size=8, clusters=2)
    assert not cld.updates_ema_in_training_step() and cld.uses_shuffle_bn()
    cld_keys = build_method("cld", TinyBackbone(), queue_size=8, ema_timing="before_keys")
    assert cld_keys.updates_ema_in_training_step()
    for name in ("simclr", "groco", "nnclr", "all4one", "pixels", "random_init"):
        method = build_method(name, TinyBackbone(), **({"queue_size": 256} if "n" in name[:2] else {}))
        assert not method.updates_ema_in_training_step() and not method.uses_shuffle_bn()
        assert method.local_bn_modules() == []


def test_pixels_embeds_the_flattened_eval_images():
    backbone = TinyBackbone()
    method = build_method("pixels", backbone).eval()
    x = torch.randn(5, 3, 4, 4)
    features = method.embed(x)
    assert features.shape == (5, 48)
    assert torch.equal(features, x.reshape(5, 48)) and torch.equal(features[2, 16:32], x[2, 1].flatten())
    # channels_last input: the same values in the same (C, H, W) order
    assert torch.equal(method.embed(x.contiguous(memory_format=torch.channels_last)), features)
    with pytest.raises(RuntimeError, match="'pixels' is a reference row with nothing to train"):
        method.training_step([x, x], torch.arange(5))


def test_random_init_embeds_with_the_untrained_backbone():
    torch.manual_seed(0)
    backbone = TinyBackbone()
    method = build_method("random_init", backbone).eval()
    x = torch.randn(4, 3, 4, 4)
    assert torch.equal(method.embed(x), backbone(x))
    assert method.embed(x).shape == (4, 8)
    with pytest.raises(RuntimeError, match="reference row"):
        method.training_step([x, x], torch.arange(4))


# ---------------------------------------------------------------------------------- NT-Xent
def test_nt_xent_hand_computed_three_images():
    # Three images at 0°, 90° and 180°, both views identical, τ = 1. Anchor at 0°: positive sim 1,
    # negatives 0, −1, 0, −1 → ℓ = log(1 + 2/e + 2/e²); the 90° anchor sees four zeros →
    # ℓ = log(1 + 4/e); 180° is like 0°.
    view = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    e = math.e
    expected = (4 * math.log(1 + 2 / e + 2 / e**2) + 2 * math.log(1 + 4 / e)) / 6
    loss = nt_xent_loss([view, view * 3.0], temperature=1.0)  # scale: normalised inside
    assert loss.item() == pytest.approx(expected, abs=1e-6)


def reference_nt_xent(views: list[torch.Tensor], temperature: float) -> float:
    """Straightforward per-anchor loops in float64 (sum of positives inside the log)."""
    z = [F.normalize(v.double(), dim=1) for v in views]
    n_views, batch = len(z), z[0].shape[0]
    total, count = 0.0, 0
    for a in range(n_views):
        for i in range(batch):
            pos, denom = 0.0, 0.0
            for b in range(n_views):
                for j in range(batch):
                    if a == b and i == j:
                        continue
                    term = math.exp(float(z[a][i] @ z[b][j]) / temperature)
                    denom += term
                    if i == j:
                        pos += term
            total += -math.log(pos / denom)
            count += 1
    return total / count


@pytest.mark.parametrize("n_views,batch,temperature", [(2, 5, 0.2), (2, 7, 0.5), (3, 4, 0.1), (4, 3, 1.0)])
def test_nt_xent_matches_independent_reference(n_views, batch, temperature):
    generator = torch.Generator().manual_seed(n_views * 100 + batch)
    views = [torch.randn(batch, 6, generator=generator) for _ in range(n_views)]
    loss = nt_xent_loss(views, temperature=temperature)
    assert loss.item() == pytest.approx(reference_nt_xent(views, temperature), rel=1e-5)


def test_nt_xent_matches_cross_entropy_form_for_two_views():
    torch.manual_seed(0)
    a, b = torch.randn(6, 5), torch.randn(6, 5)
    z = F.normalize(torch.cat([a, b]), dim=1)
    logits = z @ z.T / 0.3
    logits.fill_diagonal_(float("-inf"))
    target = torch.cat([torch.arange(6, 12), torch.arange(6)])
    assert nt_xent_loss([a, b], 0.3).item() == pytest.approx(F.cross_entropy(logits, target).item(), abs=1e-6)


def test_nt_xent_all_pairs_equals_sum_in_log_for_two_views_and_differs_for_three():
    torch.manual_seed(1)
    two = [torch.randn(5, 4) for _ in range(2)]
    assert nt_xent_loss(two, 0.2, "all_pairs").item() == pytest.approx(
        nt_xent_loss(two, 0.2, "sum_in_log").item(), abs=1e-6
    )
    three = [torch.randn(5, 4) for _ in range(3)]
    pair_losses = [nt_xent_loss([three[p], three[q]], 0.2).item() for p, q in ((0, 1), (0, 2), (1, 2))]
    # all_pairs masks the third view of the anchor's image, so it is not the 2-view loss either.
    all_pairs = nt_xent_loss(three, 0.2, "all_pairs").item()
    assert all_pairs != pytest.approx(nt_xent_loss(three, 0.2, "sum_in_log").item(), abs=1e-4)
    # all_pairs keeps the third view of *other* images as negatives, so each pair's term has more
    # negatives than the 2-view loss of that pair alone: a larger loss.
    assert all_pairs > sum(pair_losses) / 3


def test_nt_xent_topk_and_stop_grad():
    torch.manual_seed(2)
    a = torch.randn(6, 4, requires_grad=True)
    b = torch.randn(6, 4, requires_grad=True)
    full = nt_xent_loss([a, b], 0.5)
    top1 = nt_xent_loss([a, b], 0.5, topk_neg=1)
    assert top1.item() < full.item()  # fewer negatives, smaller denominator
    # topk with every negative kept is the full loss
    assert nt_xent_loss([a, b], 0.5, topk_neg=10).item() == pytest.approx(full.item(), abs=1e-6)
    loss = nt_xent_loss([a, b], 0.5, stop_grad=True)
    grad_a, = torch.autograd.grad(loss, a)
    assert torch.isfinite(grad_a).all() and grad_a.abs().sum() > 0


def test_nt_xent_is_permutation_invariant_and_finite_at_large_logits():
    torch.manual_seed(3)
    a, b = torch.randn(8, 4), torch.randn(8, 4)
    perm = torch.randperm(8)
    assert nt_xent_loss([a, b], 0.2).item() == pytest.approx(nt_xent_loss([a[perm], b[perm]], 0.2).item(), abs=1e-6)
    assert torch.isfinite(nt_xent_loss([a, a], 1e-4))


def test_nt_xent_bad_input():
    with pytest.raises(ValueError, match="at least 2 views"):
        nt_xent_loss([torch.randn(3, 2)], 0.1)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent_loss([torch.randn(3, 2)] * 2, 0.0)
    with pytest.raises(ValueError, match="topk_neg"):
        nt_xent_loss([torch.randn(3, 2)] * 2, 0.1, topk_neg=5)


def test_multi_positive_infonce_requires_a_positive():
    logits = torch.zeros(2, 3)
    pos = torch.tensor([[True, False, False], [False, False, False]])
    with pytest.raises(ValueError, match="positive"):
        multi_positive_infonce(logits, pos, ~pos)


# ---------------------------------------------------------------------------------- MoCo
def test_moco_loss_matches_formula():
    torch.manual_seed(4)
    q, k, queue = torch.randn(5, 3), torch.randn(5, 3), F.normalize(torch.randn(7, 3), dim=1)
    qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
    expected = 0.0
    for i in range(5):
        pos = math.exp(float(qn[i] @ kn[i]) / 0.2)
        neg = sum(math.exp(float(qn[i] @ queue[j]) / 0.2) for j in range(7))
        expected += -math.log(pos / (pos + neg)) / 5
    assert moco_infonce_loss(q, k, queue, 0.2).item() == pytest.approx(expected, rel=1e-5)


def test_moco_key_is_detached():
    q = torch.randn(4, 3, requires_grad=True)
    k = torch.randn(4, 3, requires_grad=True)
    moco_infonce_loss(q, k, F.normalize(torch.randn(6, 3), dim=1)).backward()
    assert q.grad is not None and k.grad is None


def test_queue_fifo_partial_fill_and_wrap():
    queue = FeatureQueue(6, 2, init="empty")
    assert queue.features().shape == (0, 2)
    queue.push(torch.ones(4, 2))
    assert queue.features().shape == (4, 2) and int(queue.pointer) == 4
    queue.push(torch.full((4, 2), 2.0))
    # rows 4, 5 then 0, 1 are overwritten by the second batch: the oldest go first
    assert queue.data[:, 0].tolist() == [2.0, 2.0, 1.0, 1.0, 2.0, 2.0]
    assert int(queue.pointer) == 2 and int(queue.filled) == 6
    with pytest.raises(MethodConfigError, match="not a multiple of the global batch 4"):
        queue.check_batch(4)


def test_queue_nearest_neighbour_uses_filled_rows_only():
    queue = FeatureQueue(4, 2, init="empty")
    queue.push(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    values, idx = queue.nearest(torch.tensor([[0.1, 1.0], [1.0, -0.2]]))
    assert idx[:, 0].tolist() == [1, 0]
    with pytest.raises(MethodConfigError, match="fewer than the k=3"):
        queue.nearest(torch.randn(1, 2), k=3)


def test_momentum_encoder_update_rule():
    online = nn.Linear(3, 2)
    ema = MomentumEncoder(online)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        online.weight.add_(1.0)
    ema.update(online, 0.9)
    assert torch.allclose(ema.module.weight, 0.9 * before + 0.1 * online.weight)
    assert not any(p.requires_grad for p in ema.parameters())


def test_moco_step_updates_key_encoder_before_keys_and_enqueues_keys():
    torch.manual_seed(5)
    method = build_method("moco", TinyBackbone(), queue_size=8, momentum=0.5, dim=4)
    online_before = [p.detach().clone() for p in method.online.parameters()]
    key_before = [p.detach().clone() for p in method.key_encoder.parameters()]
    with torch.no_grad():  # make online and key weights differ so the EMA step is visible
        for p in method.online.parameters():
            p.add_(0.5)
    views = [torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)]
    out = method.training_step(views, torch.arange(4))
    for k_old, q_old, k_new in zip(key_before, online_before, method.key_encoder.parameters(), strict=True):
        assert torch.allclose(k_new, 0.5 * k_old + 0.5 * (q_old + 0.5), atol=1e-6)
    # the 4 new keys are the key encoder's normalised outputs of view 2, at rows 0..3
    with torch.no_grad():
        keys = F.normalize(method.key_encoder(views[1]), dim=1)
    assert torch.allclose(method.queue.data[:4], keys, atol=1e-5)
    assert int(method.queue.pointer) == 4
    out["loss"].backward()
    assert all(p.grad is None for p in method.key_encoder.parameters())
    assert method.backbone.net[1].weight.grad is not None


def test_moco_three_crop_and_weak_views():
    three = build_method("moco", TinyBackbone(), queue_size=8, views=3, dim=4)
    assert three.view_kinds() == ["shared", "shared", "shared"]
    weak = build_method("moco", TinyBackbone(), queue_size=8, key_view="weak", dim=4)
    assert weak.view_kinds() == ["shared", "weak"]
    out = three.training_step([torch.randn(4, 3, 4, 4) for _ in range(3)], torch.arange(4))
    assert torch.isfinite(out["loss"])


def test_moco_after_step_timing_updates_only_after_optimizer_step():
    method = build_method("moco", TinyBackbone(), queue_size=8, ema_timing="after_step", momentum=0.0)
    with torch.no_grad():
        for p in method.online.parameters():
            p.add_(1.0)
    method.training_step([torch.randn(4, 3, 4, 4)] * 2, torch.arange(4))
    assert not torch.allclose(method.key_encoder.module[1][0].weight, method.head[0].weight)
    method.after_optimizer_step(0, 10)
    assert torch.allclose(method.key_encoder.module[1][0].weight, method.head[0].weight)


def test_moco_queue_must_be_multiple_of_batch():
    method = build_method("moco", TinyBackbone(), queue_size=1000)
    with pytest.raises(MethodConfigError, match="1000 is not a multiple of the global batch 256"):
        method.check_batch(256, 1437)
