"""Data sets, and the choice of test points and of training points to retrain without."""

from __future__ import annotations

import pytest
import torch

from influence.data import DATASETS, UnknownDataset, load_dataset
from influence.scores import select_removals, select_test_points


def test_iris_split_is_stratified_120_30():
    data = load_dataset("iris")
    assert (data.n_train, data.n_test, data.in_features, data.num_classes) == (120, 30, 4, 3)
    assert torch.bincount(data.y_train).tolist() == [40, 40, 40]
    assert torch.bincount(data.y_test).tolist() == [10, 10, 10]
    assert data.x_train.dtype == torch.float64 and data.y_train.dtype == torch.int64


def test_standardised_with_training_statistics_only():
    data = load_dataset("iris")
    assert torch.allclose(data.x_train.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(data.x_train.std(0, unbiased=False), torch.ones(4, dtype=torch.float64), atol=1e-12)
    # The test set was not used: its statistics are merely close, not exact.
    assert not torch.allclose(data.x_test.mean(0), torch.zeros(4, dtype=torch.float64), atol=1e-6)


def test_split_is_deterministic_per_seed():
    a, b = load_dataset("iris", split_seed=3), load_dataset("iris", split_seed=3)
    c = load_dataset("iris", split_seed=4)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_train, c.x_train)


def test_digits_guards_constant_pixels():
    data = load_dataset("digits", dtype=torch.float32)
    assert data.x_train.dtype == torch.float32 and data.in_features == 64 and data.num_classes == 10
    assert torch.isfinite(data.x_train).all() and torch.isfinite(data.x_test).all()
    assert data.n_train + data.n_test == 1797


def test_synthetic_size_and_determinism():
    data = load_dataset("synthetic", n=60, split_seed=1)
    assert (data.n_train, data.n_test, data.in_features, data.num_classes) == (48, 12, 4, 3)
    assert torch.equal(data.x_train, load_dataset("synthetic", n=60, split_seed=1).x_train)
    assert load_dataset("synthetic").n_train == 120
    with pytest.raises(ValueError, match="only applies to the synthetic"):
        load_dataset("iris", n=50)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(UnknownDataset) as info:
        load_dataset("mnits")
    message = str(info.value)
    assert "mnits" in message and all(name in message for name in DATASETS)
    assert isinstance(info.value, ValueError)


# ---- choosing test points -------------------------------------------------------------------------------------

# Binary-exact values so that distances to the median tie exactly. Median 0.5 (index 0).
LOSSES = torch.tensor([0.5, 3.0, 0.125, 0.25, 2.0, 0.375, 0.75], dtype=torch.float64)


def test_highest_and_median():
    assert select_test_points(LOSSES, [("highest", 2)], seed=0) == [(1, "highest"), (4, "highest")]
    # Nearest the median 0.5: index 0, then 5 (0.125 away), then 3 and 6 (both 0.25 away: the lower index first).
    assert select_test_points(LOSSES, [("median", 3)], seed=0) == [(0, "median"), (5, "median"), (3, "median")]


def test_rules_in_order_first_rule_wins_and_dict_form():
    rules = [("explicit", [4, 5]), {"rule": "highest", "k": 2}, {"median": 2}]
    # highest 2 = {1, 4}: 4 is already explicit; median 2 = {0, 5}: 5 is already explicit.
    assert select_test_points(LOSSES, rules, seed=0) == [(4, "explicit"), (5, "explicit"), (1, "highest"),
                                                         (0, "median")]


def test_random_is_seeded_and_avoids_earlier_picks():
    a = select_test_points(LOSSES, [("highest", 3), ("random", 4)], seed=5)
    assert a == select_test_points(LOSSES, [("highest", 3), ("random", 4)], seed=5)
    assert len(a) == 7 and len({i for i, _ in a}) == 7
    assert [s for _, s in a] == ["highest"] * 3 + ["random"] * 4


def test_bad_test_point_rules():
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        select_test_points(LOSSES, [("explicit", [7])], seed=0)
    with pytest.raises(ValueError, match="only 7"):
        select_test_points(LOSSES, [("highest", 8)], seed=0)
    with pytest.raises(ValueError, match=r"percentile.*\(at, k\)"):
        select_test_points(LOSSES, [("percentile", 3)], seed=0)
    with pytest.raises(ValueError, match="lowest.*highest"):
        select_test_points(LOSSES, [("lowest", 3)], seed=0)


def test_percentile_test_points():
    losses = torch.arange(11, dtype=torch.float64)  # the p-th percentile of 0..10 is p/10
    assert select_test_points(losses, [("percentile", (30, 1))], seed=0) == [(3, "percentile")]
    assert [i for i, _ in select_test_points(losses, [("percentile", (100, 2))], seed=0)] == [10, 9]
    assert [i for i, _ in select_test_points(losses, [("percentile", (50, 1))], seed=0)] == \
        [i for i, _ in select_test_points(losses, [("median", 1)], seed=0)]


# ---- choosing removals ------------------------------------------------------------------------------------------

ESTIMATE = torch.tensor([[0.1, -0.9, 0.3, 0.0, 0.5], [0.8, 0.0, -0.2, 0.7, 0.1]], dtype=torch.float64)


def test_select_removals():
    assert select_removals(ESTIMATE, "all") == [0, 1, 2, 3, 4]
    # Test point 0: |est| top-2 = {1, 4}; test point 1: {0, 3}; union, ascending.
    assert select_removals(ESTIMATE, "top_k", k=2) == [0, 1, 3, 4]
    assert select_removals(ESTIMATE, "top_k", k=1) == [0, 1]
    random = select_removals(ESTIMATE, "random", k=3, seed=1)
    assert random == select_removals(ESTIMATE, "random", k=3, seed=1) and len(set(random)) == 3
    assert random == sorted(random)
    assert select_removals(ESTIMATE, "explicit", indices=[4, 2, 4]) == [2, 4]


def test_bad_removal_rules():
    with pytest.raises(ValueError, match="top_k"):
        select_removals(ESTIMATE, "bottom_k", k=1)
    with pytest.raises(ValueError, match="k=6"):
        select_removals(ESTIMATE, "random", k=6)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        select_removals(ESTIMATE, "explicit", indices=[5])


def test_percentile_removals_per_test_point():
    estimate = torch.stack([torch.arange(11, dtype=torch.float64), -torch.arange(11, dtype=torch.float64)])
    # Row 0: the 30th percentile is 3, its two nearest are 3 and 2 (tie with 4 goes to the lower index);
    # row 1: the 30th percentile is -7, nearest 7 then 6.
    assert select_removals(estimate, "percentile", k=2, at=30) == [2, 3, 6, 7]
    with pytest.raises(ValueError, match="at"):
        select_removals(estimate, "percentile", k=2)


def test_select_groups():
    from influence.scores import select_groups

    groups = select_groups(ESTIMATE, k=2, groups=3, seed=1)
    # per test point its 2 highest estimates (signed: removing them raises that test loss most), then 3 random
    assert groups[:2] == [[2, 4], [0, 3]]
    assert len(groups) == 5 and all(len(g) == 2 and len(set(g)) == 2 for g in groups)
    assert groups[2:] == select_groups(ESTIMATE, k=2, groups=3, seed=1)[2:]
    assert select_groups(ESTIMATE, k=0, groups=1) == [[], [], []]
