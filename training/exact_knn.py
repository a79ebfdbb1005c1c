"""Exact kNN on a GPU without faiss: blocked matrix products and top-k in torch.

Its own module, free of faiss and igraph, so that a GPU machine with torch alone can run it
(benchmarks/gpu_check.py); `training.graph.knn` uses it where there is a GPU but faiss has no GPU build.
"""

from __future__ import annotations

import numpy as np


def torch_knn(embeddings: np.ndarray, k: int, *, device: str | None = None, block_size: int = 8192,
              dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN by blocked matrix products and top-k in torch: (ids [N, k] int64, similarities [N, k] float32),
    the row itself left out as in `knn`. The GPU path where faiss has no GPU build; `device` None picks CUDA
    when there is one. `dtype` "float16" halves memory and uses tensor cores (similarities to float16's precision)."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    corpus = torch.as_tensor(np.ascontiguousarray(embeddings, dtype=np.float32), device=device).to(getattr(torch, dtype))
    ids = np.empty((len(corpus), k), dtype=np.int64)
    similarities = np.empty((len(corpus), k), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(corpus), block_size):
            stop = min(start + block_size, len(corpus))
            scores = corpus[start:stop] @ corpus.T
            rows = torch.arange(start, stop, device=device)
            scores[rows - start, rows] = -torch.inf  # never a row's own neighbour
            top, index = scores.topk(k, dim=1)
            ids[start:stop], similarities[start:stop] = index.cpu().numpy(), top.float().cpu().numpy()
    return ids, similarities
