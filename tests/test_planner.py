"""Edit-order planning: k-means + balanced batches, arrival order, sentence features."""

import numpy as np
import pytest

from lemoe_engine.data import EditRecord
from lemoe_engine.errors import ConfigError
from lemoe_engine.planner import balanced_assignment, plan_order, sentence_features


def make_edits(prompts):
    return [EditRecord(p, "t", p + " again", "loc?", "a") for p in prompts]


def blobs(rng, n_per, centers, spread=0.05):
    """Well separated Gaussian blobs, rows shuffled; returns (features, true labels)."""
    k, f = centers.shape
    labels = np.repeat(np.arange(k), n_per)
    x = centers[labels] + spread * rng.standard_normal((len(labels), f))
    perm = rng.permutation(len(labels))
    return x[perm], labels[perm]


def check_partition(batches, n):
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(n))
    for b in batches:
        assert b == sorted(b)
    assert [b[0] for b in batches] == sorted(b[0] for b in batches)


@pytest.mark.parametrize("n,k", [(10, 3), (37, 5), (64, 8), (5, 5), (9, 1)])
def test_kmeans_coverage_and_balance(n, k):
    rng = np.random.default_rng()
    feats = rng.standard_normal((n, 6))
    batches = plan_order(make_edits([f"p{i}" for i in range(n)]), n_batches=k, features=feats)
    assert len(batches) == k
    check_partition(batches, n)
    sizes = [len(b) for b in batches]
    assert max(sizes) - min(sizes) <= 1


def test_batch_size_gives_ceil_batches_none_larger():
    rng = np.random.default_rng()
    feats = rng.standard_normal((23, 4))
    batches = plan_order(make_edits(["x"] * 23), batch_size=5, features=feats)
    assert len(batches) == 5
    check_partition(batches, 23)
    assert max(len(b) for b in batches) <= 5 and min(len(b) for b in batches) >= 4


def test_deterministic_for_a_seed_and_seed_matters():
    rng = np.random.default_rng()
    feats = rng.standard_normal((60, 5))  # no cluster structure: the seed decides
    edits = make_edits(["x"] * 60)
    first = plan_order(edits, n_batches=6, features=feats, seed=3)
    assert plan_order(edits, n_batches=6, features=feats.copy(), seed=3) == first
    others = [plan_order(edits, n_batches=6, features=feats, seed=s) for s in range(4, 10)]
    assert any(o != first for o in others)


def test_kmeans_recovers_separable_clusters():
    rng = np.random.default_rng()
    centers = rng.standard_normal((4, 16)) * 3.0
    feats, labels = blobs(rng, 15, centers)
    batches = plan_order(make_edits(["x"] * 60), n_batches=4, features=feats, seed=1)
    check_partition(batches, 60)
    for b in batches:
        assert len(set(labels[b].tolist())) == 1  # each batch is one true cluster
    assert sorted(len(b) for b in batches) == [15] * 4


def test_balancing_moves_only_the_overflow():
    rng = np.random.default_rng()
    centers = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([centers[0] + 0.1 * rng.standard_normal((14, 2)),
                        centers[1] + 0.1 * rng.standard_normal((8, 2)),
                        centers[2] + 0.1 * rng.standard_normal((8, 2))])
    truth = np.repeat([0, 1, 2], [14, 8, 8])
    batches = plan_order(make_edits(["x"] * 30), n_batches=3, features=x)
    assert sorted(len(b) for b in batches) == [10, 10, 10]
    # Every batch is dominated by one true cluster; only the big cluster spills over.
    pure = sum(np.bincount(truth[b], minlength=3).max() for b in batches)
    assert pure >= 26


def test_balanced_assignment_against_brute_force():
    rng = np.random.default_rng()
    d = rng.random((7, 3))
    sizes = [3, 2, 2]
    labels = balanced_assignment(d, sizes)
    assert np.bincount(labels, minlength=3).tolist() == sizes
    # The pair with the globally smallest distance is always taken.
    i, j = np.unravel_index(np.argmin(d), d.shape)
    assert labels[i] == j


def test_plan_none_arrival_order():
    edits = make_edits(["x"] * 10)
    assert plan_order(edits, batch_size=4, plan="none") == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert plan_order(edits, n_batches=3, plan="none") == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    assert plan_order(edits, batch_size=50, plan="none") == [list(range(10))]


@pytest.mark.parametrize("kwargs,msg", [
    (dict(), "exactly one"),
    (dict(n_batches=2, batch_size=2), "exactly one"),
    (dict(n_batches=0), "positive integer"),
    (dict(batch_size=-1), "positive integer"),
    (dict(n_batches=2.5), "positive integer"),
    (dict(n_batches=True), "positive integer"),
    (dict(n_batches=11), "cannot split 10 edits into 11"),
    (dict(n_batches=2, plan="random"), "unknown plan"),
    (dict(n_batches=2, features=np.zeros((9, 3))), r"shape \[10, f\]"),
    (dict(n_batches=2, features=np.full((10, 3), np.nan)), "NaN"),
    (dict(n_batches=2, seed="a"), "seed"),
])
def test_bad_arguments(kwargs, msg):
    kwargs.setdefault("features", np.random.default_rng().standard_normal((10, 3)))
    with pytest.raises(ConfigError, match=msg):
        plan_order(make_edits(["x"] * 10), **kwargs)


def test_no_edits():
    with pytest.raises(ConfigError, match="no edits"):
        plan_order([], n_batches=1, plan="none")


# ---------------------------------------------------------------- sentence features
def test_sentence_features_are_normalised_and_batch_independent():
    texts = ["What is the capital of France?", "Which continent is Chile in?",
             "What is 17 plus 25?", "Which chemical element has the symbol Fe?",
             "What is the capital city of France?"]
    feats = sentence_features(texts, batch_size=2)
    assert feats.shape == (5, 384) and feats.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, atol=1e-5)
    # Padding must not leak into the pooled vector: one sentence at a time gives the same.
    single = np.concatenate([sentence_features([t]) for t in texts])
    np.testing.assert_allclose(feats, single, atol=2e-5)
    sims = feats @ feats.T
    assert sims[0, 4] > 0.8 and sims[0, 4] > sims[0, 2] + 0.3  # paraphrase vs arithmetic
    assert sentence_features([]).shape == (0, 384)


def test_kmeans_default_features_group_by_topic():
    capitals = [f"What is the capital of {c}?" for c in
                ("France", "Peru", "Kenya", "Japan", "Chile", "Ghana")]
    sums = [f"What is {a} plus {b}?" for a, b in ((3, 4), (12, 9), (40, 2), (7, 7), (5, 6), (8, 1))]
    mixed = [p for pair in zip(capitals, sums) for p in pair]  # interleaved arrival order
    batches = plan_order(make_edits(mixed), n_batches=2, seed=0)
    groups = [{("capital" in mixed[i]) for i in b} for b in batches]
    assert groups == [{True}, {False}] or groups == [{False}, {True}]


# ---------------------------------------------------------------- plan="keys"
def test_keys_plan_groups_indistinguishable_keys_only():
    rng = np.random.default_rng()
    directions = rng.standard_normal((4, 64))
    pattern = [0, 1, 0, 2, 3, 1, 0]
    # near-copies of a direction (cos > 0.99), at random scales: cosine decides, not length
    keys = np.stack([directions[p] * rng.uniform(0.5, 3.0) + 0.01 * rng.standard_normal(64)
                     for p in pattern])
    keys = np.vstack([keys, np.zeros((1, 64))])  # a key-less edit stands alone
    groups = plan_order(make_edits(["x"] * 8), plan="keys", features=keys)
    assert groups == [[0, 2, 6], [1, 5], [3], [4], [7]]
    # at similarity 1.0 nothing merges; a low bar merges everything but the zero row
    assert plan_order(make_edits(["x"] * 8), plan="keys", features=keys, similarity=1.0) == [[i] for i in range(8)]
    assert plan_order(make_edits(["x"] * 8), plan="keys", features=np.abs(keys), similarity=1e-3) == [
        list(range(7)), [7]]


@pytest.mark.parametrize("kwargs,msg", [
    (dict(batch_size=2), "sizes experts by itself"),
    (dict(n_batches=2), "sizes experts by itself"),
    (dict(features=None), "needs features"),
    (dict(similarity=0.0), "similarity"),
    (dict(features=np.zeros((9, 3))), r"shape \[10, f\]"),
])
def test_keys_plan_bad_arguments(kwargs, msg):
    kwargs.setdefault("features", np.random.default_rng().standard_normal((10, 3)))
    with pytest.raises(ConfigError, match=msg):
        plan_order(make_edits(["x"] * 10), plan="keys", **kwargs)
