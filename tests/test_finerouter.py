"""FineRouter: Stage 2 trains, the artifact round-trips and refuses tampering, and it routes by the rule."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import synthetic_routing_set

from serve.artifact import ArtifactError, RouterArtifact
from training.fit import FitConfig, fit_router, task_table
from training.moe import NetworkConfig, platt_scaling, quality_loss, train_networks

SMALL = FitConfig(ks=(10,), mixes=(0.5,), resolutions=(1.0,), min_task_size=10, trainer="local", network=NetworkConfig(epochs=15, task_epochs=5))


@pytest.fixture(scope="module")
def data():
    return synthetic_routing_set()


@pytest.fixture(scope="module")
def artifact(data):
    return fit_router(data, SMALL, log=lambda message: None)


def test_moe_loss_falls(data):
    labels = np.arange(len(data.table)) % 3
    networks = train_networks(
        {"inputs": data.embeddings, "scores": data.table.scores.astype(np.float32), "costs": data.table.costs / data.cost_scale,
         "tasks": labels, "candidates": np.ones((3, 3), np.float32)},
        NetworkConfig(epochs=10, task_epochs=3, pairwise_weight=0.5, decision_weight=0.5),
    )
    losses = networks["history"]["phase1_loss"]
    assert losses[-1] < 0.8 * losses[0]


def test_decision_loss_rewards_the_choice_the_rule_should_make():
    # Both models solve the prompt; the second costs a tenth: at every cost weight above 0 it is the right choice.
    scores, costs = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.1]])
    only_decision = NetworkConfig(decision_weight=1.0)
    right, wrong = torch.tensor([[2.0, 3.0]]), torch.tensor([[3.0, 2.0]])
    bce = NetworkConfig()
    decision_part = [quality_loss(z, scores, costs, only_decision) - quality_loss(z, scores, costs, bce) for z in (right, wrong)]
    assert decision_part[0] < decision_part[1]


def test_task_table_shrinks_small_tasks_toward_the_global_mean():
    scores = np.array([[1.0, 0.0]] * 2 + [[0.0, 1.0]] * 98)
    labels = np.array([0, 0] + [1] * 98)
    table = task_table(labels, scores, shrinkage=20)
    global_mean = scores.mean(axis=0)
    assert abs(table[0, 0] - global_mean[0]) < abs(1.0 - global_mean[0]) / 2  # 2 prompts: pulled most of the way
    assert table[1, 1] > 0.95  # 98 prompts: barely moved


def test_fit_finds_the_planted_specialists(data, artifact):
    quality, _ = artifact.predict(data.embeddings, data.table.prompts)
    kinds = np.array([int(b[-1]) for b in data.table.benchmarks])
    best = quality.argmax(axis=1)
    assert (best[kinds == 1] == 1).mean() > 0.8  # "mid" is the specialist of kind 1
    assert (best[kinds == 2] == 2).mean() > 0.8  # "small" of kind 2


def test_platt_scaling_recovers_a_known_miscalibration():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, size=(20000, 2))
    truth = 1 / (1 + np.exp(-(np.array([0.5, 2.0]) * logits + np.array([1.0, -0.5]))))
    scale, shift = platt_scaling(logits, (rng.random(truth.shape) < truth).astype(np.float32))
    np.testing.assert_allclose(scale, [0.5, 2.0], atol=0.1)
    np.testing.assert_allclose(shift, [1.0, -0.5], atol=0.1)


def test_calibrated_fit_stores_its_scaling_and_applies_it(data, artifact):
    calibrated = fit_router(data, replace(SMALL, calibrate=True), log=lambda message: None)
    assert not np.allclose(calibrated.weights["calibration_scale"], 1.0)
    np.testing.assert_array_equal(artifact.weights["calibration_scale"], 1.0)  # off by default: identity
    plain = calibrated.with_blend(1.0)
    plain.weights["calibration_scale"], plain.weights["calibration_shift"] = np.ones(3, np.float32), np.zeros(3, np.float32)
    logits, _ = calibrated.moe_logits(data.embeddings, data.table.prompts)
    expected = 1 / (1 + np.exp(-(calibrated.weights["calibration_scale"] * logits + calibrated.weights["calibration_shift"])))
    np.testing.assert_allclose(calibrated.with_blend(1.0).predict(data.embeddings, data.table.prompts)[0], expected, rtol=1e-5)
    np.testing.assert_allclose(plain.predict(data.embeddings, data.table.prompts)[0], 1 / (1 + np.exp(-logits)), rtol=1e-5)


def test_route_follows_the_decision_rule(data, artifact):
    tokens = data.table.prompt_tokens
    best = artifact.route(data.embeddings, data.table.prompts, tokens, 0.0)
    np.testing.assert_array_equal(best.order[:, 0], best.quality.argmax(axis=1))
    cheap = artifact.route(data.embeddings, data.table.prompts, tokens, 1e6)
    assert (cheap.order[:, 0] == 2).all()
    capped = artifact.route(data.embeddings, data.table.prompts, tokens, 0.0, allowed=np.array([True, True, False]), cost_cap=1e-4)
    assert set(capped.order[:, 0]) <= {0, 1} and (capped.cost[np.arange(len(tokens)), capped.order[:, 0]] <= 1e-4).all()


def test_artifact_round_trips(tmp_path, data, artifact):
    artifact.save(tmp_path / "router")
    loaded = RouterArtifact.load(tmp_path / "router")
    assert loaded.models == artifact.models and loaded.manifest["tasks"] == artifact.manifest["tasks"]
    for name, array in artifact.weights.items():
        np.testing.assert_array_equal(loaded.weights[name], array)
    np.testing.assert_allclose(loaded.predict(data.embeddings, data.table.prompts)[0], artifact.predict(data.embeddings, data.table.prompts)[0])


def test_saving_over_an_artifact_replaces_it_whole(tmp_path, artifact):
    artifact.save(tmp_path / "router")
    artifact.save(tmp_path / "router")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["router"]


def test_tampered_weights_are_refused(tmp_path, artifact):
    path = artifact.save(tmp_path / "router")
    with open(path / "weights.npz", "r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00\x01\x02")
    with pytest.raises(ArtifactError, match="weights.npz: checksum mismatch"):
        RouterArtifact.load(path)


def test_incomplete_and_mismatched_artifacts_are_refused(tmp_path, artifact):
    path = artifact.save(tmp_path / "router")
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "models": manifest["models"][:2]}))
    with pytest.raises(ArtifactError, match="weights are for 3 models, the manifest lists 2"):
        RouterArtifact.load(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(ArtifactError, match="format_version 99"):
        RouterArtifact.load(path)
    (path / "weights.npz").unlink()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="weights.npz: missing"):
        RouterArtifact.load(path)
    with pytest.raises(ArtifactError, match="no manifest.json"):
        RouterArtifact.load(tmp_path / "elsewhere")


@pytest.mark.slow
def test_ray_train_gives_the_same_networks_as_the_local_loop(ray_session, data):
    from training.moe import train_with_ray

    inputs = {"inputs": data.embeddings, "scores": data.table.scores.astype(np.float32), "costs": data.table.costs / data.cost_scale,
              "tasks": np.arange(len(data.table)) % 2, "candidates": np.ones((2, 3), np.float32)}
    config = NetworkConfig(epochs=2, task_epochs=1)
    remote = train_with_ray(inputs, config, num_workers=1)
    local = train_networks(inputs, config)
    for name, tensor in local["moe"].items():
        np.testing.assert_allclose(remote["moe"][name].numpy(), tensor.numpy(), rtol=1e-5, atol=1e-6)
