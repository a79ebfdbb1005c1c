"""The streamed fit (`python -m training fit --input`): shards hold every training row once, the kNN graph and
Leiden built from the shards give the in-memory path's graph and tasks, and the whole fit yields an artifact
that routes."""

import json

import numpy as np
import pytest
from conftest import small_fit_config, synthetic_routing_set

pytestmark = pytest.mark.slow


def write_user_data(folder, data, files: int = 2, test_every: int = 0):
    """The TrainingSet's table as a user's JSON Lines files (rows dealt round-robin); every `test_every`-th row is
    a test row."""
    folder.mkdir(parents=True, exist_ok=True)
    table = data.table
    handles = [open(folder / f"part-{f}.jsonl", "w") for f in range(files)]
    for i in range(len(table)):
        record = {"prompt": table.prompts[i], "scores": dict(zip(table.models, table.scores[i].tolist())),
                  "costs": dict(zip(table.models, table.costs[i].tolist())), "benchmark": table.benchmarks[i],
                  "split": "test" if test_every and i % test_every == 0 else "train"}
        handles[i % files].write(json.dumps(record) + "\n")
    for handle in handles:
        handle.close()
    return folder


@pytest.fixture(scope="module")
def streamed(ray_session, tmp_path_factory):
    """(corpus, its source TrainingSet, the input folder, the workspace): 300 rows in two files, every tenth a
    test row, cut into shards of at most 70 input rows (three per file)."""
    from serve.core.encoder import DEFAULT_EMBEDDER
    from training.corpus import embed_corpus

    data = synthetic_routing_set(rows=300)
    folder = write_user_data(tmp_path_factory.mktemp("input"), data, test_every=10)
    workspace = str(tmp_path_factory.mktemp("workspace"))
    corpus = embed_corpus(str(folder), DEFAULT_EMBEDDER, workspace=workspace, rows_per_shard=70, log=lambda message: None)
    return corpus, data, folder, workspace


def _in_row_order(corpus, column: str) -> np.ndarray:
    return np.concatenate([corpus.read(shard, [column])[column] for shard in range(len(corpus.shards))])


def test_shards_hold_every_training_row_once_with_the_encoders_embedding(streamed):
    from serve.core.encoder import encode, load_encoder
    from training.corpus import Corpus, embed_corpus

    corpus, data, folder, workspace = streamed
    assert len(corpus.shards) == 6 and corpus.validation_below == pytest.approx(0.2)
    parts = [corpus.read(s, ["prompt", "embedding"], part) for s in range(len(corpus.shards)) for part in ("train", "validation")]
    prompts = [p for part in parts for p in part["prompt"]]
    assert sorted(prompts) == sorted(data.table.prompts[i] for i in range(len(data.table)) if i % 10)  # no test row, each once
    assert corpus.rows == sum(len(part["prompt"]) for part in parts[::2]) == len(_in_row_order(corpus, "prompt"))
    embeddings = np.concatenate([part["embedding"] for part in parts])
    np.testing.assert_allclose(embeddings, encode(load_encoder(corpus.embedder), prompts), atol=1e-5)

    said = []
    assert embed_corpus(str(folder), corpus.embedder, workspace=workspace, rows_per_shard=70, log=said.append) == Corpus.load(corpus.folder)
    assert "cached" in said[0]  # the same input and encoder: the shards are reused, nothing is embedded again


@pytest.mark.parametrize("method", ["exact", "ivf"])
def test_streamed_knn_and_leiden_give_the_in_memory_graph_and_tasks(streamed, tmp_path, method):
    from training.corpus import read_table
    from training.fit import task_table
    from training.graph import leiden, merge_small_communities, task_graph
    from training.neighbours import knn
    from training.streamed_tasks import corpus_tasks, knn_edges, read_edges

    corpus = streamed[0]
    seconds = {}
    edges = knn_edges(corpus, 10, method=method, seed=1, seconds=seconds)
    neighbours, similarities = read_edges(corpus, edges)
    embeddings, scores = _in_row_order(corpus, "embedding"), _in_row_order(corpus, "scores")
    expected_neighbours, expected_similarities = knn(embeddings, 10, method=method, seed=1)
    np.testing.assert_array_equal(neighbours, expected_neighbours)
    np.testing.assert_array_equal(similarities, expected_similarities)
    assert set(seconds) == {"knn_read", "knn_build", "knn_write"}
    assert knn_edges(corpus, 10, method=method, seed=1) == edges  # complete: reused

    labels_path = str(tmp_path / f"tasks-{method}.parquet")
    table = corpus_tasks(corpus, edges, 10, mix=0.5, resolution=1.0, min_size=20, shrinkage=20.0, seed=0, labels_path=labels_path)
    expected = merge_small_communities(leiden(task_graph(expected_neighbours, expected_similarities, scores, 0.5), 1.0, 0), embeddings, 20)
    np.testing.assert_array_equal(read_table(labels_path, ["task"]).column("task").to_numpy(), expected)
    np.testing.assert_allclose(table, task_table(expected, scores, 20.0))


def test_streamed_fit_writes_an_artifact_that_routes(streamed, tmp_path):
    from training.streaming import fit_streaming

    corpus, data, folder, workspace = streamed
    config = small_fit_config(epochs=3, task_epochs=1, trainer="ray")
    artifact = fit_streaming(str(folder), config, workspace=workspace, log=lambda message: None)
    assert artifact.models == data.table.models and artifact.manifest["training_rows"] == corpus.rows
    streamed = artifact.manifest["validation"]["streamed"]
    assert streamed["input"] == str(folder) and set(streamed["seconds"]) == {"embed", "stage1_settings", "knn", "tasks", "stage2", "blend"}
    artifact.save(tmp_path / "artifact")
    from serve.core.artifact import RouterArtifact

    loaded = RouterArtifact.load(tmp_path / "artifact")
    ranking = loaded.route(data.embeddings[:5], data.table.prompts[:5], data.table.prompt_tokens[:5], 0.05)
    assert len(ranking.order) == 5
