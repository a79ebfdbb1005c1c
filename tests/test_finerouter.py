"""FineRouter: Stage 2 trains, the artifact round-trips and refuses tampering, and it routes by the rule."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import small_fit_config, stage2_data, synthetic_routing_set

from serve.core.artifact import ArtifactError, RouterArtifact, network_inputs
from training.fit import fit_router, task_table
from training.moe import NetworkConfig, export_weights, train_networks
from training.moe.networks import MixtureOfExperts, TaskClassifier


@pytest.fixture(scope="module")
def data():
    return synthetic_routing_set()


@pytest.fixture(scope="module")
def artifact(data):
    return fit_router(data, small_fit_config(), log=lambda message: None)


def test_moe_loss_falls(data):
    labels = np.arange(len(data.table)) % 3
    networks = train_networks(
        {"inputs": data.embeddings, "scores": data.table.scores.astype(np.float32), "tasks": labels, "candidates": np.ones((3, 3), np.float32)},
        NetworkConfig(epochs=10, task_epochs=3),
    )
    losses = networks["history"]["phase1_loss"]
    assert losses[-1] < 0.8 * losses[0]


def test_early_stopping_keeps_the_epoch_of_lowest_validation_loss(data):
    network_data = stage2_data(data)
    validation_inputs, validation_scores = network_data["validation_inputs"], network_data["validation_scores"]
    config = NetworkConfig(epochs=12, task_epochs=0, learning_rate=0.05)  # a rate that overfits within a few epochs
    stopped, ran_on = train_networks(network_data, config), train_networks(network_data, replace(config, early_stopping=False))
    history = stopped["history"]["phase1_validation"]
    assert np.argmin(history) < len(history) - 1  # the loss rose again: there is something to stop

    def validation_loss(networks):
        moe = MixtureOfExperts(384, config.hidden, 3, torch.ones(2, 3), config.dropout)
        moe.load_state_dict(networks["moe"])
        moe.eval()
        with torch.no_grad():
            logits = moe(torch.as_tensor(validation_inputs))
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.as_tensor(validation_scores)).item()

    assert validation_loss(stopped) == pytest.approx(min(history), rel=1e-5)
    assert validation_loss(ran_on) == pytest.approx(ran_on["history"]["phase1_validation"][-1], rel=1e-5)


def test_the_artifacts_numpy_inference_matches_the_trained_torch_networks(data, artifact):
    """Train/serve skew guard: the artifact's inputs and NumPy forward pass reproduce the torch networks."""
    weights = artifact.weights
    inputs = network_inputs(data.embeddings, data.table.prompts, weights["feature_mean"], weights["feature_std"])
    tasks, hidden = weights["classifier_w2"].shape[1], weights["trunk_w"].shape[1]
    classifier = TaskClassifier(inputs.shape[1], weights["classifier_w1"].shape[1], tasks, 0.0)
    moe = MixtureOfExperts(inputs.shape[1], hidden, 3, torch.as_tensor(weights["candidates"]), 0.0)
    # Load the exported arrays back into torch modules and check the export is their exact inverse.
    classifier.load_state_dict({"layers.0.weight": torch.as_tensor(weights["classifier_w1"].T), "layers.0.bias": torch.as_tensor(weights["classifier_b1"]),
                                "layers.3.weight": torch.as_tensor(weights["classifier_w2"].T), "layers.3.bias": torch.as_tensor(weights["classifier_b2"])})
    moe.load_state_dict({"trunk.0.weight": torch.as_tensor(weights["trunk_w"].T), "trunk.0.bias": torch.as_tensor(weights["trunk_b"]),
                         "general.weight": torch.as_tensor(weights["general_w"].T), "general.bias": torch.as_tensor(weights["general_b"]),
                         "task_w": torch.as_tensor(weights["task_w"]), "task_b": torch.as_tensor(weights["task_b"]),
                         "candidates": torch.as_tensor(weights["candidates"])})
    exported = export_weights({"classifier": classifier.state_dict(), "moe": moe.state_dict()})
    for name, array in exported.items():
        np.testing.assert_array_equal(array, weights[name])
    classifier.eval()
    moe.eval()
    with torch.no_grad():
        x = torch.as_tensor(inputs)
        gate = torch.softmax(classifier(x), dim=1)
        torch_logits = moe(x, gate).numpy()
    numpy_logits, numpy_tasks = artifact.moe_logits(artifact.inputs(data.embeddings, data.table.prompts))
    np.testing.assert_allclose(numpy_tasks, gate.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(numpy_logits, torch_logits, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("stop_after", [3, 5])  # in phase 1, and in phase 2 (4 + 2 epochs)
def test_a_run_resumed_from_an_epoch_checkpoint_ends_as_the_uninterrupted_run(data, stop_after):
    import copy

    network_data = stage2_data(data)
    config = NetworkConfig(epochs=4, task_epochs=2)
    states = []
    whole = train_networks(network_data, config, checkpoint=lambda state: states.append(copy.deepcopy(state)))
    resumed = train_networks(network_data, config, resume=states[stop_after - 1])
    assert resumed["history"]["resumed_at_epoch"] == [stop_after]
    for part in ("moe", "classifier"):
        for name, tensor in whole[part].items():
            torch.testing.assert_close(resumed[part][name], tensor, rtol=0, atol=0)
    assert resumed["history"]["phase2_validation"] == whole["history"]["phase2_validation"]


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
    from training.moe import in_memory_datasets, train_with_ray

    inputs = stage2_data(data)
    config = NetworkConfig(epochs=2, task_epochs=1)
    remote = train_with_ray(in_memory_datasets(inputs), inputs["candidates"], config, num_workers=1)
    local = train_networks(inputs, config)
    for name, tensor in local["moe"].items():
        np.testing.assert_allclose(remote["moe"][name].numpy(), tensor.numpy(), rtol=1e-5, atol=1e-6)
    assert remote["history"]["phase1_validation"] == pytest.approx(local["history"]["phase1_validation"])
