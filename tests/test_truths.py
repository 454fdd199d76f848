"""The solved ground truths (influence/truths.py) against known answers, their spec, and a run of all of them.

- PBRF linearises to the Gauss-Newton influence estimate with the same damping: the ratio of the test-loss
  response (scaled back by ε) to the estimate tends to 1 as ε shrinks, on L2 logistic regression (where the
  Gauss-Newton matrix is the Hessian) and on a tanh MLP.
- The last layer of a model whose only layer is the last is the whole model: its refit is the exact
  leave-one-out optimum (the full objective's gradient vanishes there).
- Batched solves equal one-at-a-time solves (float64) after the same number of Newton steps.
- A spec lists several kinds side by side; leave-one-out keeps its ids; mistakes get one message and exit 2.
"""
from __future__ import annotations

import pytest
import torch
import yaml

from fragile.cli import main
from influence.curvature import curvature_matrix
from influence.data import load_dataset
from influence.models import MLP
from influence.objective import per_example_loss
from influence.retrain import objective_grad_norms, removal_weights
from influence.scores import per_example_grads
from influence.train import train
from influence import truths
from jobs.spec import SpecError, load_spec, parse_spec
from storage import tables
from storage.uri import open_store

SMOKE = "jobs/specs/iris-smoke.yaml"
DAMPING = 0.01


@pytest.fixture(scope="module")
def iris():
    return load_dataset("iris")


def _trained(iris, depth: int, wd: float):
    model = MLP(4, 3, depth, 5)
    if depth == 0:
        result = train(model, iris.x_train, iris.y_train, weight_decay=wd, lr=1.0, epochs=200, seed=0,
                       optimizer="lbfgs")
    else:
        result = train(model, iris.x_train, iris.y_train, weight_decay=wd, lr=0.01, epochs=1500, seed=0)
    return model, result.theta


def _ggn_estimates(model, theta, iris, wd: float, removed: list[int]) -> torch.Tensor:
    """(1/n) ∇L(z_t)ᵀ (G + (wd + δ) I)⁻¹ ∇L(z_i) for the first test point and the removed points."""
    x, y = iris.x_train, iris.y_train
    g = curvature_matrix(model, theta, x, y, wd, "ggn") + DAMPING * torch.eye(model.n_params, dtype=torch.float64)
    grads = per_example_grads(model, theta, x, y)[removed]
    gt = per_example_grads(model, theta, iris.x_test[:1], iris.y_test[:1])[0]
    return grads @ torch.linalg.solve(g, gt) / x.shape[0]


@pytest.mark.parametrize("depth, wd", [(0, 0.01), (1, 0.005)])
def test_pbrf_tends_to_the_gauss_newton_estimate_as_epsilon_shrinks(iris, depth, wd):
    model, theta = _trained(iris, depth, wd)
    removed = [0, 17, 40, 77, 101]
    estimate = _ggn_estimates(model, theta, iris, wd, removed)
    weights = removal_weights(iris.x_train.shape[0], removed, controls=1)
    errors = []
    for scale in (1.0, 0.1, 0.01, 0.001):
        solved = truths.pbrf(model, theta, iris.x_train, iris.y_train, weights, weight_decay=wd, damping=DAMPING,
                             tol=1e-13, max_iter=50, scale=scale)
        assert bool(solved.converged(1e-12).all())
        assert torch.equal(solved.theta[0], theta)  # nothing removed: θ̂ is the response
        loss = per_example_loss(model, solved.theta, iris.x_test[:1], iris.y_test[:1])[:, 0]
        ratio = (loss[1:] - loss[0]) / scale / estimate
        errors.append(float((ratio - 1).abs().max()))
    # First order: the error of the ratio shrinks like ε (at ε = −1/n itself it can be large: the response of a
    # network is not linear in a whole point's weight).
    assert errors[3] < 1e-3 and all(b < a / 5 for a, b in zip(errors, errors[1:])), errors


def test_batched_pbrf_equals_one_at_a_time(iris):
    model, theta = _trained(iris, 2, 0.0)
    weights = removal_weights(iris.x_train.shape[0], [3, 50, 90, 119], controls=1)
    common = dict(weight_decay=0.0, damping=DAMPING, tol=1e-30, max_iter=3)  # three Newton steps, no early stop
    batched = truths.pbrf(model, theta, iris.x_train, iris.y_train, weights, **common)
    looped = truths.pbrf(model, theta, iris.x_train, iris.y_train, weights, batched=False, **common)
    assert (batched.theta - looped.theta).abs().max() < 1e-8
    assert torch.equal(batched.iterations, looped.iterations)
    assert ((batched.theta[1:] - theta).norm(dim=1) > 1e-5).all()  # the steps went somewhere


def test_the_last_layer_of_a_logistic_model_is_its_exact_leave_one_out(iris):
    model, theta = _trained(iris, 0, 0.01)
    removed = [5, 60, 110]
    weights = removal_weights(iris.x_train.shape[0], removed, controls=1)
    solved = truths.last_layer(model, theta, iris.x_train, iris.y_train, weights, weight_decay=0.01, damping=0.0,
                               tol=1e-12, max_iter=50)
    # The gradient of the whole leave-one-out objective, by autograd apart from the solver, vanishes: the refit is
    # the unique (strictly convex) optimum without each point.
    norms = objective_grad_norms(model, solved.theta, iris.x_train, iris.y_train, weights, 0.01)
    assert norms.max() < 1e-11
    assert ((solved.theta[1:] - solved.theta[0]).norm(dim=1) > 1e-3).all()


def test_last_layer_refits_only_the_last_layer(iris):
    model, theta = _trained(iris, 2, 0.005)
    weights = removal_weights(iris.x_train.shape[0], [1, 2], controls=1)
    solved = truths.last_layer(model, theta, iris.x_train, iris.y_train, weights, weight_decay=0.005, damping=0.0,
                               tol=1e-12, max_iter=50)
    last = model.layers()[-1]
    frozen = torch.ones(model.n_params, dtype=torch.bool)
    frozen[last.weight] = frozen[last.bias] = False
    assert torch.equal(solved.theta[:, frozen], theta.expand(3, -1)[:, frozen])
    assert bool(solved.converged(1e-12).all())


# ---- the spec -----------------------------------------------------------------------------------------------------

def _smoke(**truth) -> dict:
    with open(SMOKE) as f:
        data = yaml.safe_load(f)
    data["ground_truth"].update(truth)
    return data


def test_kinds_run_side_by_side_on_the_same_models_and_leave_loo_ids_alone():
    plain = load_spec(SMOKE).configurations()
    spec = parse_spec(_smoke(kind=["loo_warm", "pbrf", "last_layer", "loo_scratch"], pbrf={"tol": 1e-9}))
    configs = spec.configurations()
    assert len(configs) == 4 * len(plain)
    by_truth = {t: [c for c in configs if c.truth == t] for t in ("loo_warm", "pbrf", "last_layer", "loo_scratch")}
    assert [c.config_id for c in by_truth["loo_warm"]] == [c.config_id for c in plain]
    for kind in by_truth.values():  # every kind on the same trained models
        assert [c.model_key for c in kind] == [c.model_key for c in plain]
    pbrf = by_truth["pbrf"][0]
    assert dict(pbrf.truth_settings) == {"damping": 0.01, "tol": 1e-9, "max_iter": 100}
    assert (pbrf.controls, pbrf.replicates, pbrf.retrain_epochs) == (1, 1, 0)
    # A scratch retrain beside a warm one repeats θ̂'s schedule, not the warm start's epochs.
    assert by_truth["loo_scratch"][0].retrain_epochs == plain[0].epochs
    # last_layer's damping: 0 with weight decay (strictly convex), the influence damping without.
    assert {c.weight_decay: c.truth_setting("damping") for c in by_truth["last_layer"]} == {0.005: 0.0, 0.0: 0.01}
    assert spec.swept_axes() == [["depth", "weight_decay", "ground_truth"]]


def test_a_ground_truth_setting_is_part_of_the_id_but_not_of_the_model():
    one, other = (parse_spec(_smoke(kind="pbrf", pbrf={"tol": tol})).configurations()[0] for tol in (1e-9, 1e-10))
    assert one.config_id != other.config_id and one.model_key == other.model_key
    # How many replicates of the LDS subsets is a measurement: more of them resume the same configuration.
    few, more = (parse_spec(_smoke(kind="lds", lds={"replicates": r})).configurations()[0] for r in (1, 3))
    assert few.config_id == more.config_id and (few.replicates, more.replicates) == (1, 3)


@pytest.mark.parametrize("truth, key", [
    ({"kind": "datamodels"}, "ground_truth.kind"),
    ({"kind": "lds", "lds": {"fraction": 1.0}}, "ground_truth.lds.fraction"),
    ({"kind": "lds", "lds": {"subsets": 2}}, "ground_truth.lds.subsets"),
    ({"kind": "lds", "lds": {"start": "cold"}}, "ground_truth.lds.start"),
    ({"kind": []}, "ground_truth.kind"),
    ({"kind": ["pbrf", "pbrf"]}, "ground_truth.kind"),
    ({"kind": ["pbrf"], "last_layer": {"tol": 1e-9}}, "ground_truth.last_layer"),
    ({"kind": "pbrf", "pbrf": {"tl": 1e-9}}, "ground_truth.pbrf.tl"),
    ({"kind": "pbrf", "pbrf": {"tol": 0}}, "ground_truth.pbrf.tol"),
    ({"kind": "pbrf", "pbrf": {"max_iter": 0}}, "ground_truth.pbrf.max_iter"),
    ({"kind": "last_layer", "last_layer": {"damping": 0}}, "ground_truth.last_layer.damping"),
    ({"kind": ["loo_scratch"], "start": "warm"}, "ground_truth.start"),
])
def test_a_ground_truth_mistake_names_its_key(truth, key):
    with pytest.raises(SpecError) as err:
        parse_spec(_smoke(**truth))
    assert err.value.key == key, str(err.value)


def test_a_ground_truth_mistake_exits_2_and_writes_nothing(tmp_path, capsys):
    spec = tmp_path / "bad.yaml"
    spec.write_text(yaml.safe_dump(_smoke(kind="pbrf", pbrf={"tol": -1})))
    assert main(["run", str(spec), "--store", str(tmp_path / "store"), "--inline"]) == 2
    err = capsys.readouterr().err
    assert "ground_truth.pbrf.tol" in err and err.count("\n") <= 2, err
    assert not (tmp_path / "store").exists() or not any((tmp_path / "store").rglob("*.parquet"))


# ---- a run of every kind -------------------------------------------------------------------------------------------

TRUTHS = """experiment: truths
model: {depth: 1}
train: {epochs: 800}
influence:
  methods: [exact, cg]
  cg: {curvature: ggn, tol: 1.0e-10, max_iter: 400}
  damping_policy: always
ground_truth: {kind: [loo_warm, pbrf, last_layer], epochs: 40, controls: 2, chunk: 64}
sweep: {weight_decay: [0.005, 0.0]}
"""


def test_every_kind_lands_in_the_same_tables_and_resumes(tmp_path, capsys):
    spec = tmp_path / "truths.yaml"
    spec.write_text(TRUTHS)
    store_dir = tmp_path / "store"
    assert main(["run", str(spec), "--store", str(store_dir), "--inline"]) == 0
    out = capsys.readouterr().out
    assert "by weight decay × ground truth" in out
    store = open_store(str(store_dir))
    retrain = tables.read_table(store, "truths", "retrain").to_pydict()
    stats = tables.read_table(store, "truths", "stats").to_pydict()
    configs = tables.read_table(store, "truths", "configs").to_pydict()
    assert sorted(configs["ground_truth"]) == sorted(["loo_warm", "pbrf", "last_layer"] * 2)
    assert set(retrain["ground_truth"]) == {"loo_warm", "pbrf", "last_layer"}
    final = [t for t, f in zip(stats["ground_truth"], stats["final"]) if f]
    assert sorted(set(final)) == ["last_layer", "loo_warm", "pbrf"] and len(final) == 3 * 2 * 2 * 2
    for truth, norm, iters, removed, epochs in zip(retrain["ground_truth"], retrain["grad_norm"],
                                                   retrain["iterations"], retrain["removed"], retrain["epochs"]):
        if truth == "loo_warm":
            assert iters is None and epochs == 40
        else:  # solved to its tolerance, the control included (removed -1)
            assert norm <= 1e-10 and iters is not None and epochs == 0
    solved_removed = {r for t, r in zip(retrain["ground_truth"], retrain["removed"]) if t == "pbrf"}
    assert solved_removed == {-1, *range(120)}  # one control: no training noise
    # PBRF is what the Gauss-Newton estimate with the same damping approximates: with weight decay they rank
    # the removals almost alike.
    paired = [s for s, t, m, f, c in zip(stats["spearman"], stats["ground_truth"], stats["method"], stats["final"],
                                         stats["config_id"])
              if f and t == "pbrf" and m == "cg" and configs["weight_decay"][configs["config_id"].index(c)] > 0]
    assert len(paired) == 2 and min(paired) > 0.95, paired
    assert main(["run", str(spec), "--store", str(store_dir), "--inline"]) == 0
    assert "0 tasks run" in capsys.readouterr().out


# ---- LDS -----------------------------------------------------------------------------------------------------------

LDS = """experiment: lds
model: {family: logistic}
train: {weight_decay: 0.01}
influence: {methods: [exact]}
test_points: [{highest: 1}, {median: 1}, {random: 2}]
ground_truth: {kind: lds, lds: {subsets: 30, fraction: 0.9, replicates: 2}}
"""


@pytest.fixture(scope="module")
def lds_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lds")
    spec = folder / "lds.yaml"
    spec.write_text(LDS)
    assert main(["run", str(spec), "--store", str(folder / "store"), "--inline"]) == 0
    return open_store(str(folder / "store")), load_spec(spec)


def test_lds_of_exact_influence_on_a_convex_model_with_small_subsets_removed_exceeds_0_9(lds_run):
    store, spec = lds_run
    stats = [r for r in tables.read_table(store, "lds", "stats").to_pylist() if r["final"]]
    assert len(stats) == 4 and all(r["ground_truth"] == "lds" and r["n"] == 30 for r in stats)
    assert min(r["spearman"] for r in stats) > 0.9, [r["spearman"] for r in stats]
    assert all(r["replicates"] == 2 for r in stats)  # L-BFGS retrains: the replicates agree, the ceiling is ~1
    assert all(r["spearman_boot_lo"] <= r["spearman"] <= r["spearman_boot_hi"] for r in stats)


def test_lds_masks_predictions_and_scores_recompute_from_the_stored_tables(lds_run):
    import numpy as np

    from influence.metrics import spearman
    from jobs import protocol
    from storage.query import query

    store, spec = lds_run
    cfg = spec.configurations()[0]
    subsets = tables.read_table(store, "lds", "subsets").to_pylist()
    assert [s["subset"] for s in sorted(subsets, key=lambda s: s["subset"])] == list(range(30))
    for s in subsets:  # the stored mask is the one its seed draws, and its hash says so
        n = s["n_train"]
        kept = np.random.default_rng(s["seed"]).choice(n, size=round(0.9 * n), replace=False)
        assert s["left_out"] == sorted(set(range(n)) - set(kept.tolist()))
        assert s["mask_hash"] == protocol.mask_hash(n, s["left_out"])
    # predicted: Σ of the left-out points' estimates; measured: the replicates' mean test-loss change; LDS per test
    # point: their Spearman over the subsets.
    rows = query("""
        with predicted as (
            select s.subset, i.test_idx, sum(i.estimate) as predicted
            from subsets s, unnest(s.left_out) as u(train_idx)
            join influence i on i.train_idx = u.train_idx and i.config_id = s.config_id
            group by all),
        measured as (
            select removed as subset, test_idx, avg(actual) as measured from retrain where removed >= 0 group by all)
        select test_idx, list(p.predicted order by subset) as predicted, list(m.measured order by subset) as measured
        from predicted p join measured m using (subset, test_idx) group by test_idx order by test_idx""",
                 store, "lds").to_pylist()
    stats = {r["test_idx"]: r["spearman"] for r in tables.read_table(store, "lds", "stats").to_pylist() if r["final"]}
    assert len(rows) == len(stats) == 4
    for row in rows:
        assert len(row["predicted"]) == 30
        assert abs(spearman(row["predicted"], row["measured"]) - stats[row["test_idx"]]) < 1e-12
    assert cfg.truth == "lds"
