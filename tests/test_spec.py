"""Experiment specs: parsing, grid expansion and one clear message per user mistake (ids: test_spec_ids.py)."""
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from jobs import spec as S
from jobs.spec import Configuration, RemovalRule, Resources, SpecError, TestPointRule, load_spec, parse_spec

ROOT = Path(__file__).resolve().parents[1]
SPECS = sorted((ROOT / "jobs" / "specs").glob("*.yaml"))

EXAMPLE = """\
experiment: iris            # folder name under the store: [A-Za-z0-9_-]+
data:
  name: iris                # dataset
  test_fraction: 0.2
  split_seed: 0
model:
  family: mlp               # mlp | logistic (logistic = depth 0)
  depth: 1
  width: 5
  activation: tanh
train:
  optimizer: adam
  lr: 0.01
  epochs: 4000
  weight_decay: 0.005
  seed: 0
influence:
  methods: [exact]
  damping: 0.01
  damping_policy: if_indefinite
test_points:                # rules, in order
  - highest: 1              # the k highest-loss test points
  - median: 1               # the k nearest the median loss
  # - random: 3
  # - explicit: [0, 5]
ground_truth:
  removals: all             # all | {top_k: 40} | {random: 20} | {explicit: [1, 2]}
  epochs: 240               # warm-start retraining epochs; default: round(0.06 * train.epochs)
  lr: null                  # default: train.lr
  controls: 3               # control retrains with nothing removed: the first from θ̂ exactly, the others from θ̂ perturbed (noise floor)
  perturbation: 1.0e-12     # relative size of the perturbation of the extra controls
  chunk: 128                # removals per retrain task (one batched computation each)
resources:                  # Ray resources per task kind
  train: {num_cpus: 1}
  influence: {num_cpus: 1}
  retrain: {num_cpus: 1, num_gpus: 0}
sweep:                      # one grid (mapping) or a list of grids (their union, de-duplicated, order preserved)
  - depth: [1, 2, 3]
    weight_decay: [0.005, 0.0]
    seed: [0, 1]
  - width: [8, 14]
    weight_decay: [0.005, 0.0]
"""


def write(tmp_path, text, name="t.yaml"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def ids(spec):
    return [c.config_id for c in spec.configurations()]


# ---- the shipped spec files and the documented format -----------------------------------------------------

@pytest.mark.parametrize("path", SPECS, ids=[p.name for p in SPECS])
def test_shipped_specs_parse(path):
    spec = load_spec(path)
    assert spec.experiment == path.stem
    assert spec.configurations()


def test_iris_smoke_spec():
    spec = load_spec(ROOT / "jobs/specs/iris-smoke.yaml")
    configs = spec.configurations()
    assert [(c.depth, c.weight_decay, c.seed) for c in configs] == [
        (1, 0.005, 0), (1, 0.0, 0), (2, 0.005, 0), (2, 0.0, 0)]
    c = configs[0]
    assert (c.dataset, c.model, c.activation, c.epochs, c.lr) == ("iris", "mlp", "tanh", 1500, 0.01)
    assert (c.retrain_epochs, c.retrain_lr, c.controls, c.retrain_chunk) == (100, 0.01, 2, 64)
    assert c.removals == (RemovalRule("all"),)
    assert c.test_points == (TestPointRule("highest", 1), TestPointRule("median", 1))
    assert spec.swept_axes() == [["depth", "weight_decay"]]


def test_iris_spec_is_the_papers_grid():
    spec = load_spec(ROOT / "jobs/specs/iris.yaml")
    configs = spec.configurations()
    assert len(configs) == 8 * 2 * 5 + 6 * 2 * 5 == 140
    assert {(c.depth, c.width) for c in configs} == {(d, 5) for d in range(1, 9)} | {
        (1, w) for w in (8, 14, 20, 30, 40, 50)}
    assert {c.weight_decay for c in configs} == {0.005, 0.0} and {c.seed for c in configs} == set(range(5))
    assert {(c.replicates, len(c.test_points)) for c in configs} == {(2, 3)}
    c = configs[0]
    assert (c.epochs, c.lr, c.retrain_epochs, c.controls, c.retrain_chunk, c.damping, c.damping_policy) == (
        4000, 0.01, 240, 3, 128, 0.01, "if_indefinite")
    assert spec.swept_axes() == [["depth", "weight_decay"], ["width", "weight_decay"]]


def test_example_from_the_docs_parses(tmp_path):
    spec = load_spec(write(tmp_path, EXAMPLE, "iris.yaml"))
    assert spec.source.endswith("iris.yaml") and spec.experiment == "iris"
    assert len(spec.configurations()) == 3 * 2 * 2 + 2 * 2
    assert spec.base == Configuration("iris")  # the example spells out the defaults
    assert spec.resources == {"train": Resources(1.0), "influence": Resources(1.0), "retrain": Resources(1.0, 0.0)}
    assert spec.resources["retrain"].ray_options() == {"num_cpus": 1.0, "num_gpus": 0.0}
    assert spec.grids[1] == {"width": (8, 14), "weight_decay": (0.005, 0.0)}


def test_the_optimizer_defaults_to_lbfgs_for_a_convex_model_trained_full_batch():
    base = {"experiment": "x", "model": {"family": "logistic"}}
    c = parse_spec(base).base
    assert (c.optimizer, c.lr, c.retrain_lr) == ("lbfgs", 1.0, 1.0)
    # Minibatches or a schedule: L-BFGS does not apply, Adam is the default as for every other model.
    assert parse_spec(base | {"train": {"batch_size": 32}}).base.optimizer == "adam"
    assert parse_spec(base | {"train": {"schedule": "cosine"}}).base.optimizer == "adam"
    mlp = parse_spec({"experiment": "x"}).base
    assert (mlp.optimizer, mlp.lr) == ("adam", 0.01)
    # Resolved per configuration of a sweep; what a spec states is kept.
    swept = parse_spec({"experiment": "x", "sweep": {"model": ["mlp", "logistic"]}}).configurations()
    assert [c.optimizer for c in swept] == ["adam", "lbfgs"]
    assert parse_spec(base | {"train": {"optimizer": "adam"}}).base.optimizer == "adam"
    # The MLP ids are what they were when the default was a plain "adam" / 0.01: stored results resume.
    assert mlp.config_id == Configuration("x", optimizer="adam", lr=0.01).config_id


def test_defaults_give_one_configuration():
    spec = parse_spec({"experiment": "x"})
    assert spec.configurations() == [spec.base] == [Configuration("x")]
    assert spec.grids == ({},) and spec.swept_axes() == [[]]
    assert set(spec.resources) == set(S.RESOURCE_KINDS)
    c = spec.base
    assert (c.retrain_epochs, c.retrain_lr, c.perturbation, c.methods) == (240, 0.01, 1e-12, ("exact",))


def test_empty_sections_mean_defaults():
    assert parse_spec({"experiment": "x", "model": None, "resources": {"train": None}}).base == Configuration("x")


def test_derived_retrain_settings_follow_the_swept_values():
    spec = parse_spec({"experiment": "x", "sweep": {"epochs": [1000, 4000], "lr": [0.1]}})
    assert [(c.retrain_epochs, c.retrain_lr) for c in spec.configurations()] == [(60, 0.1), (240, 0.1)]
    explicit = parse_spec({"experiment": "x", "ground_truth": {"epochs": 7, "lr": 0.5},
                           "sweep": {"epochs": [1000, 4000]}})
    assert {(c.retrain_epochs, c.retrain_lr) for c in explicit.configurations()} == {(7, 0.5)}


# ---- grid expansion -----------------------------------------------------------------------------------------

def test_union_of_grids_dedups_and_keeps_order():
    spec = parse_spec({"experiment": "x", "sweep": [{"depth": [1, 2]}, {"depth": [3, 2], "width": [5]}]})
    assert [c.depth for c in spec.configurations()] == [1, 2, 3]


def test_duplicate_values_in_a_list_are_fine():
    spec = parse_spec({"experiment": "x", "sweep": {"depth": [1, 1, 2], "seed": [0, 1], "lr": [0.1, 0.1]}})
    assert len(spec.configurations()) == 4
    assert spec.grids == ({"depth": (1, 2), "seed": (0, 1), "lr": (0.1,)},)
    assert spec.swept_axes() == [["depth"]]  # seed excluded, single-valued lr excluded


def test_first_axis_is_outermost():
    spec = parse_spec({"experiment": "x", "sweep": {"seed": [0, 1], "depth": [1, 2]}})
    assert [(c.seed, c.depth) for c in spec.configurations()] == [(0, 1), (0, 2), (1, 1), (1, 2)]


def test_logistic_has_no_hidden_layers():
    spec = parse_spec({"experiment": "x", "sweep": {"model": ["mlp", "logistic"], "depth": [1, 2],
                                                    "width": [5, 9]}})
    configs = spec.configurations()
    assert [(c.model, c.depth, c.width) for c in configs] == [
        ("mlp", 1, 5), ("mlp", 1, 9), ("mlp", 2, 5), ("mlp", 2, 9), ("logistic", 0, 0)]
    assert configs[-1].label() == "logistic wd0.005 s0"
    assert parse_spec({"experiment": "x", "model": {"family": "logistic", "depth": 0}}).base.depth == 0


def test_rules_parse():
    spec = parse_spec({"experiment": "x",
                       "test_points": [{"highest": 2}, {"median": 1}, {"random": 3}, {"explicit": [4, 0, 4]}],
                       "ground_truth": {"removals": {"top_k": 40}}})
    assert spec.base.test_points == (TestPointRule("highest", 2), TestPointRule("median", 1),
                                     TestPointRule("random", 3), TestPointRule("explicit", 2, (4, 0)))
    assert spec.base.removals == (RemovalRule("top_k", 40),)
    for removals, rule in [({"random": 20}, RemovalRule("random", 20)),
                           ({"explicit": [1, 2]}, RemovalRule("explicit", 2, (1, 2))),
                           ({"percentile": {"at": 30, "k": 100}}, RemovalRule("percentile", 100, at=30.0)),
                           ({"group": {"k": 40, "random": 5}}, RemovalRule("group", 40, groups=5))]:
        assert parse_spec({"experiment": "x", "ground_truth": {"removals": removals}}).base.removals == (rule,)


def test_removal_lists_and_percentile_test_points():
    # Koh & Liang's small-MNIST protocol: the top 100 by estimate and 100 at the 30th percentile, together.
    spec = parse_spec({"experiment": "x", "test_points": [{"percentile": 30}, {"percentile": {"at": 90, "k": 2}}],
                       "ground_truth": {"removals": [{"top_k": 100}, {"percentile": {"at": 30, "k": 100}}]}})
    assert spec.base.removals == (RemovalRule("top_k", 100), RemovalRule("percentile", 100, at=30.0))
    assert spec.base.test_points == (TestPointRule("percentile", 1, at=30.0), TestPointRule("percentile", 2, at=90.0))
    assert spec.base.to_dict()["removals"][1] == {"kind": "percentile", "k": 100, "indices": [], "at": 30.0}
    for bad, words in [([{"group": {"k": 4, "random": 2}}, {"top_k": 3}], "cannot be combined"),
                       ([{"top_k": 3}, {"top_k": 4}], "at most once"),
                       ({"percentile": {"k": 4}}, "missing"), ({"group": {"k": 4}}, "missing"),
                       ({"percentile": {"at": 130, "k": 4}}, "between 0 and 100")]:
        with pytest.raises(SpecError, match=words):
            parse_spec({"experiment": "x", "ground_truth": {"removals": bad}})


def test_image_settings_are_checked_against_the_data():
    base = {"experiment": "x", "data": {"name": "mnist", "root": "/data"}, "model": {"family": "small_cnn"}}
    c = parse_spec(base).base
    assert (c.depth, c.width, c.label()) == (0, 0, "small_cnn wd0.005 s0")
    for change, words in [({"data": {"name": "iris"}}, "needs image data"),
                          ({"data": {"name": "mnist"}}, "data.root"),
                          ({"data": {"name": "iris", "subset": 0.1}, "model": {"family": "mlp"}}, "fixed size"),
                          ({"data": {"name": "mnist", "root": "/d", "classes": 3}}, "only for imagenet"),
                          ({"train": {"mixed_precision": True}}, "float32"),
                          ({"data": {"name": "mnist", "root": "/d", "subset": 1.5}}, "fraction")]:
        with pytest.raises(SpecError, match=words):
            parse_spec({**base, **change})
    scratch = parse_spec({**base, "train": {"epochs": 50}, "ground_truth": {"start": "scratch"}}).base
    assert scratch.retrain_epochs == 50  # from scratch: the whole schedule again


def test_exponent_floats_and_int_floats(tmp_path):
    spec = load_spec(write(tmp_path, "experiment: x\nground_truth:\n  perturbation: 1e-9\ntrain:\n  lr: 1\n"))
    assert spec.base.perturbation == 1e-9 and spec.base.lr == 1.0 and isinstance(spec.base.lr, float)


# ---- one clear message per mistake --------------------------------------------------------------------------

MISTAKES = [
    # unknown keys, with the allowed keys and a suggestion
    ("modle:\n  depth: 2", ["modle", "unknown key", "did you mean 'model'"]),
    ("model:\n  dept: 2", ["model.dept", "unknown key", "family, depth, width, activation", "'depth'"]),
    ("ground_truth:\n  chunks: 2", ["ground_truth.chunks", "'chunk'"]),
    ("resources:\n  trian: {num_cpus: 1}", ["resources.trian", "did you mean 'train'"]),
    ("resources:\n  train: {cpus: 1}", ["resources.train.cpus", "'num_cpus'"]),
    # wrong types
    ("model:\n  depth: true", ["model.depth", "true is not allowed", "integer"]),
    ("train:\n  epochs: 10.5", ["train.epochs", "10.5"]),
    ("train:\n  lr: fast", ["train.lr", "'fast'", "number > 0"]),
    ("train:\n  seed: -1", ["train.seed", "-1"]),
    ("data:\n  split_seed: '0'", ["data.split_seed", "'0'"]),
    ("model: 3", ["model", "3 is not allowed", "mapping"]),
    ("model:\n  depth: null", ["model.depth", "null"]),
    # ranges
    ("model:\n  depth: 0", ["model.depth", "0 is not allowed", ">= 1"]),
    ("model:\n  width: 0", ["model.width", "0 is not allowed", ">= 1"]),
    ("train:\n  weight_decay: -0.1", ["train.weight_decay", "-0.1"]),
    ("influence:\n  damping: -1", ["influence.damping", "-1", ">= 0"]),
    ("train:\n  lr: 0", ["train.lr", "0 is not allowed", "> 0"]),
    ("train:\n  lr: -0.01", ["train.lr", "-0.01"]),
    ("train:\n  epochs: 0", ["train.epochs", "0 is not allowed", ">= 1"]),
    ("ground_truth:\n  epochs: -1", ["ground_truth.epochs", "-1", ">= 0"]),
    ("ground_truth:\n  lr: 0", ["ground_truth.lr", "0"]),
    ("ground_truth:\n  controls: 0", ["ground_truth.controls", "0", ">= 1"]),
    ("ground_truth:\n  chunk: 0", ["ground_truth.chunk", "0"]),
    ("ground_truth:\n  perturbation: -1.0e-12", ["ground_truth.perturbation", "-1e-12"]),
    ("data:\n  test_fraction: 1.0", ["data.test_fraction", "1.0", "between 0 and 1"]),
    ("data:\n  test_fraction: 0", ["data.test_fraction", "0 is not allowed"]),
    ("resources:\n  retrain: {num_cpus: -1}", ["resources.retrain.num_cpus", "-1"]),
    ("resources:\n  retrain: {num_gpus: -0.5}", ["resources.retrain.num_gpus", "-0.5"]),
    # unknown names
    ("data:\n  name: irsi", ["data.name", "'irsi'", "iris, digits, synthetic", "did you mean 'iris'"]),
    ("model:\n  family: cnn", ["model.family", "'cnn'", "mlp, logistic"]),
    ("model:\n  activation: tahn", ["model.activation", "'tahn'", "did you mean 'tanh'"]),
    ("influence:\n  methods: [magic]", ["influence.methods", "'magic'", "exact"]),
    ("influence:\n  methods: [exact]\n  lissa: {scale: auto}", ["influence.lissa", "does not run"]),
    ("influence:\n  methods: [lissa]\n  lissa: {scal: auto}", ["influence.lissa.scal", "did you mean 'scale'"]),
    ("influence:\n  methods: [lissa]\n  lissa: {scale: -1}", ["influence.lissa.scale", "-1", "auto"]),
    ("influence:\n  methods: [cg]\n  cg: {tol: 2}", ["influence.cg.tol", "2"]),
    ("influence:\n  methods: exact", ["influence.methods", "'exact'", "list"]),
    ("influence:\n  methods: []", ["influence.methods", "[]"]),
    ("train:\n  optimizer: rmsprop", ["train.optimizer", "'rmsprop'", "adam, sgd, lbfgs"]),
    ("train:\n  optimizer: lbfgs\n  batch_size: 32", ["train.batch_size", "L-BFGS takes full-batch steps"]),
    ("ground_truth:\n  replicates: 0", ["ground_truth.replicates", "0"]),
    ("ground_truth:\n  checkpoint_every: 0", ["ground_truth.checkpoint_every", "0 is not allowed"]),
    ("resources:\n  train: {workers: 0}", ["resources.train.workers", "0 is not allowed", "integer >= 1"]),
    ("resources:\n  retrain: {workers: 2}", ["resources.retrain.workers", "unknown key"]),
    ("model:\n  family: logistic\nresources:\n  train: {workers: 2}",
     ["resources.train.workers", "2", "L-BFGS runs on one worker", "train.optimizer"]),
    ("train:\n  checkpoint_every: 100", ["train.checkpoint_every", "100", "resources.train.workers > 1"]),
    ("resources:\n  train: {workers: 2, num_gpus: 0.5}", ["resources.train.num_gpus", "0.5", "a whole GPU each"]),
    ("train:\n  dtype: float32\n  mixed_precision: true\nresources:\n  train: {workers: 2}",
     ["resources.train.num_gpus", "mixed precision runs on CUDA"]),
    ("model:\n  family: logistic\nground_truth:\n  checkpoint_every: 500",
     ["ground_truth.checkpoint_every", "500", "L-BFGS retrains cannot resume", "adam or sgd"]),
    ("train:\n  grad_tol: 0", ["train.grad_tol", "a number > 0"]),
    ("train:\n  optimizer: lbfgs\n  schedule: cosine", ["train.schedule", "L-BFGS takes full-batch steps"]),
    ("influence:\n  damping_policy: sometimes", ["influence.damping_policy", "'sometimes'", "if_indefinite"]),
    ("test_points:\n  - lowest: 1", ["test_points[0]", "'lowest'", "highest, median, percentile, random, explicit"]),
    ("ground_truth:\n  removals: {bottom_k: 3}", ["ground_truth.removals", "'bottom_k'", "top_k"]),
    ("ground_truth:\n  removals: top_k", ["ground_truth.removals", "'top_k'", "{top_k: K}"]),
    ("ground_truth:\n  removals: [1, 2]", ["ground_truth.removals[0]", "1 is not allowed"]),
    # rules
    ("test_points:\n  - {highest: 1, median: 1}", ["test_points[0]", "one-key mapping"]),
    ("test_points:\n  - median: 1\n  - highest", ["test_points[1]", "'highest'", "one-key mapping"]),
    ("test_points: []", ["test_points", "[]", "non-empty"]),
    ("test_points:\n  - highest: 0", ["test_points[0].highest", "0 is not allowed", ">= 1"]),
    ("test_points:\n  - random: two", ["test_points[0].random", "'two'"]),
    ("test_points:\n  - explicit: []", ["test_points[0].explicit", "[]"]),
    ("test_points:\n  - explicit: [3, -1]", ["test_points[0].explicit", "-1"]),
    ("ground_truth:\n  removals: {top_k: 0}", ["ground_truth.removals.top_k", "0"]),
    ("ground_truth:\n  removals: {random: 0}", ["ground_truth.removals.random", "0"]),
    # the sweep
    ("sweep:\n  depth: []", ["sweep.depth", "[]", "at least one value"]),
    ("sweep:\n  - depth: [1]\n  - methods: [[exact]]", ["sweep[1].methods", "not sweepable", "influence.methods"]),
    ("sweep:\n  test_points: [1]", ["sweep.test_points", "not sweepable"]),
    ("sweep:\n  train_checkpoint_every: [10, 20]", ["sweep.train_checkpoint_every", "not sweepable"]),
    ("sweep:\n  retrain_checkpoint_every: [10, 20]", ["sweep.retrain_checkpoint_every", "not sweepable",
                                                      "ground_truth.checkpoint_every"]),
    ("sweep:\n  - dept: [1]", ["sweep[0].dept", "unknown key", "did you mean 'depth'"]),
    ("sweep:\n  chunk: [1]", ["sweep.chunk", "did you mean 'retrain_chunk'"]),
    ("sweep:\n  ground_truth.epochs: [1]", ["sweep.ground_truth.epochs", "did you mean 'retrain_epochs'"]),
    ("sweep:\n  - depth: 3", ["sweep[0].depth", "3 is not allowed", "list"]),
    ("sweep:\n  - depth: [1, 0]", ["sweep[0].depth: 0 is not allowed (depth must be an integer >= 1)"]),
    ("sweep:\n  lr: [0.1, -1]", ["sweep.lr", "-1"]),
    ("sweep:\n  activation: [tanh, tahn]", ["sweep.activation", "'tahn'"]),
    ("sweep:\n  model: [logistic, mlp]\n  width: [0]", ["sweep.width", "0 is not allowed"]),
    ("sweep: 3", ["sweep", "3 is not allowed", "grid"]),
    ("sweep: []", ["sweep", "[]", "non-empty list of grids"]),
    ("sweep:\n  - [1, 2]", ["sweep[0]", "[1, 2]", "mapping"]),
    # the experiment and the file itself
    ("experiment: 'my exp!'", ["experiment", "'my exp!'", "letters, digits"]),
    ("experiment: 2021", ["experiment", "2021", 'quote it: experiment: "2021"']),
    ("data:\n  name: iris", ["experiment", "missing"]),
    ("- a\n- b", ['["a", "b"] is not allowed', "mapping"]),
    ("", ["empty"]),
    ("experiment: x\nmodel: {depth: 1\n", ["invalid YAML", "line 3"]),
    ("experiment: x\nmodel:\n  depth: 1\n  depth: 2", ["invalid YAML", "line 4", "duplicate key 'depth'", "line 3"]),
]


def _yaml(snippet):
    return snippet if snippet.startswith(("experiment", "data:\n  name: iris", "-")) or not snippet else (
        "experiment: t\n" + snippet)


@pytest.mark.parametrize("snippet, expected", MISTAKES, ids=[m[0].split("\n")[-1][:40] for m in MISTAKES])
def test_mistake_gives_one_clear_line(tmp_path, snippet, expected):
    path = write(tmp_path, _yaml(snippet), "bad.yaml")
    with pytest.raises(SpecError) as info:
        load_spec(path)
    message = str(info.value)
    assert message.startswith(f"spec {path}: ") and "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_error_attributes_name_the_mistake():
    with pytest.raises(SpecError) as info:
        parse_spec({"experiment": "x", "sweep": [{"depth": [1, 0]}]}, "iris.yaml")
    e = info.value
    assert (e.key, e.value, e.source) == ("sweep[0].depth", 0, "iris.yaml")
    assert str(e) == "spec iris.yaml: sweep[0].depth: 0 is not allowed (depth must be an integer >= 1)"
    assert "depth" in e.allowed


def test_mistakes_are_caught_the_same_without_yaml():
    # parse_spec takes already-loaded data: each snippet above reports the same line through it.
    for snippet, expected in MISTAKES:
        try:
            data = yaml.safe_load(_yaml(snippet))
        except yaml.YAMLError:
            continue
        if "duplicate" in "".join(expected):
            continue
        with pytest.raises(SpecError) as info:
            parse_spec(data, "s.yaml")
        assert all(part in str(info.value) for part in expected), (snippet, str(info.value))


def test_missing_file(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.yaml")
    message = str(info.value)
    assert str(tmp_path / "nope.yaml") in message and "no such file" in message and "iris.yaml" in message


def test_direct_construction_validates_too():
    with pytest.raises(SpecError, match=r"^spec <spec>: depth: 0 is not allowed"):
        Configuration("x", depth=0)
    with pytest.raises(SpecError, match="k must be an integer >= 1"):
        TestPointRule("highest", 0)
    with pytest.raises(SpecError, match="num_cpus"):
        Resources(num_cpus=-1)
    with pytest.raises(SpecError, match="only explicit"):
        RemovalRule("top_k", 3, (1,))


def test_import_is_light():
    code = "import sys, jobs.spec; print(sorted(m for m in ('torch', 'ray', 'numpy') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_docs_example_stays_in_step_with_the_defaults():
    # Each key the example spells out has the default value: the comment "defaults as shown" holds.
    data = yaml.safe_load(textwrap.dedent(EXAMPLE))
    data.pop("sweep")
    assert parse_spec(data).base == parse_spec({"experiment": "iris"}).base


@pytest.mark.parametrize("given, expected", [(1024, 1024), ("16GiB", 16 * 2 ** 30), ("512MB", 512 * 10 ** 6),
                                             ("2g", 2 * 10 ** 9), ("1.5KiB", 1536)])
def test_resource_memory_sizes(given, expected):
    resources = Resources(memory=given)
    assert resources.memory == expected and resources.ray_options()["memory"] == expected
    assert "memory" not in Resources().ray_options()  # no reservation unless asked


def test_the_sweep_size_is_checked_before_expansion():
    data = {"experiment": "x", "sweep": [{"seed": list(range(50)), "width": [1, 2]}, {"seed": [1, 2], "width": [1]}]}
    assert S.grid_size(S._grids(data["sweep"])[0]) == 102
    with pytest.raises(SpecError, match="102 configurations"):
        parse_spec(data, max_configurations=100)
    assert len(parse_spec(data, max_configurations=102).configurations()) == 100  # the second grid repeats
