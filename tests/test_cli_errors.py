"""Every mistake a user can make at the command line: one message, exit code 2, nothing written.
These never start Ray: the checks come before any work."""
from __future__ import annotations

from pathlib import Path

import pytest

from fragile.cli import main
from storage import tables
from storage.uri import open_store

SMOKE = Path(__file__).resolve().parents[1] / "jobs" / "specs" / "iris-smoke.yaml"


def _spec(tmp_path: Path, text: str) -> str:
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text, expected", [
    ("experiment: x\nmodel: {depth: 0}\n", ["model.depth", "0"]),
    ("experiment: x\ndata: {name: cifar100}\n", ["data.name", "cifar100", "iris"]),
    ("experiment: x\nmodel: {activation: swish}\n", ["model.activation", "swish", "tanh"]),
    ("experiment: x\ninfluence: {methods: [magic]}\n", ["influence.methods", "magic", "exact"]),
    ("experiment: x\ntrain: {weight_decay: -0.1}\n", ["train.weight_decay", "-0.1"]),
    ("experiment: x\nsweep: {depth: []}\n", ["sweep.depth", "at least one value"]),
    ("experiment: x\nmodel: {depht: 2}\n", ["depht", "depth"]),
    ("experiment: x\ntrain: {epochs: many}\n", ["train.epochs", "many"]),
])
def test_bad_spec_message_exit_2_and_nothing_written(tmp_path, capsys, text, expected):
    store = tmp_path / "store"
    code = main(["run", _spec(tmp_path, text), "--store", str(store)])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("error:") == 1
    for word in expected:
        assert word in err, (word, err)
    assert not store.exists()


def test_validate_reports_the_same_errors(tmp_path, capsys):
    assert main(["validate", _spec(tmp_path, "experiment: x\nmodel: {width: 0}\n")]) == 2
    assert "model.width" in capsys.readouterr().err


def test_missing_spec_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml"), "--store", str(tmp_path / "s")]) == 2
    assert "nope.yaml" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_unsupported_store_scheme(capsys):
    assert main(["run", str(SMOKE), "--store", "gs://bucket"]) == 2
    assert "gs" in capsys.readouterr().err


def test_s3_store_problems_stop_the_run_before_any_work(s3_env, monkeypatch, capsys):
    """A missing bucket, wrong credentials, an unreachable endpoint: one message each, exit 2."""
    from cluster.s3server import free_port

    assert main(["run", str(SMOKE), "--store", "s3://no-such-bucket/x"]) == 2
    assert "no-such-bucket" in capsys.readouterr().err
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    assert main(["run", str(SMOKE), "--store", f"s3://{s3_env.bucket}/x"]) == 2
    assert "AWS_SECRET_ACCESS_KEY" in capsys.readouterr().err
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    assert main(["query", "select 1", "--store", f"s3://{s3_env.bucket}/x"]) == 2
    assert "AWS_ENDPOINT_URL" in capsys.readouterr().err


def test_store_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["run", str(SMOKE), "--store", str(f)]) == 2
    assert str(f) in capsys.readouterr().err


def test_validate_prints_configurations_and_task_counts(capsys):
    assert main(["validate", str(SMOKE)]) == 0
    out = capsys.readouterr().out
    assert "4 configurations" in out
    assert "train 4, influence 20, retrain 8" in out  # 5 methods x 1 chunk of test points


def _store_with_two_experiments(tmp_path):
    store = open_store(str(tmp_path / "s"))
    for exp in ("a", "b"):
        tables.write_part(store, exp, "test_points", "c1", "test_points",
                          {"test_idx": [1], "loss": [0.5], "label": [0], "selection": ["highest"]})
    return store


def test_query_needs_experiment_when_ambiguous(tmp_path, capsys):
    store = _store_with_two_experiments(tmp_path)
    assert main(["query", "select 1", "--store", store.uri]) == 2
    err = capsys.readouterr().err
    assert "--experiment" in err and "a, b" in err


def test_bad_sql_names_the_tables(tmp_path, capsys):
    store = _store_with_two_experiments(tmp_path)
    assert main(["query", "select nope from stats", "--store", store.uri, "--experiment", "a"]) == 2
    err = capsys.readouterr().err
    assert "nope" in err and "test_points" in err


def test_query_of_absent_store(tmp_path, capsys):
    assert main(["query", "select 1", "--store", str(tmp_path / "absent")]) == 2
    assert "absent" in capsys.readouterr().err
    assert not (tmp_path / "absent").exists()


def test_submit_to_an_unreachable_cluster(capsys):
    from cluster.s3server import free_port

    address = f"http://127.0.0.1:{free_port()}"
    assert main(["submit", str(SMOKE), "--address", address, "--store", "s3://b/p"]) == 2
    err = capsys.readouterr().err
    assert address in err and "fragile cluster up" in err
    assert main(["status", "--address", address]) == 2
    assert address in capsys.readouterr().err


def test_submit_needs_a_store(monkeypatch, capsys):
    monkeypatch.delenv("FRAGILE_STORE", raising=False)
    assert main(["submit", str(SMOKE), "--address", "http://127.0.0.1:1"]) == 2
    assert "--store" in capsys.readouterr().err


def test_yaml_anchors_and_aliases_are_refused(tmp_path, capsys):
    spec = _spec(tmp_path, "experiment: x\nbase: &b {epochs: 5}\ntrain: *b\n")
    assert main(["validate", spec]) == 2
    err = capsys.readouterr().err
    assert "anchor &b is not allowed" in err and "line 2" in err


def test_a_sweep_of_more_than_10000_configurations_needs_yes(tmp_path, capsys):
    seeds = ", ".join(str(s) for s in range(101))
    spec = _spec(tmp_path, f"experiment: x\nsweep: {{seed: [{seeds}], width: [{seeds}]}}\n")
    store = tmp_path / "store"
    assert main(["run", spec, "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert "10,201 configurations" in err and "--yes" in err
    assert not store.exists()
    assert main(["submit", spec, "--address", "http://127.0.0.1:1", "--store", "s3://b/p"]) == 2
    assert "--yes" in capsys.readouterr().err


def test_exact_on_a_model_too_large_for_the_task_memory_is_refused(tmp_path, capsys):
    """4*50 + 50 + 50*3 + 3 = 403 parameters: about 3.7 MiB for exact, more than the 1 MiB declared."""
    text = ("experiment: x\nmodel: {width: 50}\ninfluence: {methods: [exact, cg]}\n"
            "resources: {influence: {memory: 1MiB}}\n")
    store = tmp_path / "store"
    for command in (["validate", _spec(tmp_path, text)], ["run", _spec(tmp_path, text), "--store", str(store)]):
        assert main(command) == 2
        err = " ".join(capsys.readouterr().err.split())
        assert "exact forms the dense Hessian" in err and "403 parameters" in err and "1.0 MiB" in err
        assert "cg, lissa, arnoldi, ekfac" in err
    assert not store.exists()
    assert main(["validate", _spec(tmp_path, text.replace("1MiB", "64MiB"))]) == 0


def test_bad_resource_memory(tmp_path, capsys):
    assert main(["validate", _spec(tmp_path, "experiment: x\nresources: {train: {memory: lots}}\n")]) == 2
    assert "resources.train.memory" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["FRAGILE_STORE_RETRY_S", "FRAGILE_LEASE_TTL_S"])
def test_a_mistyped_duration_in_the_environment(tmp_path, monkeypatch, capsys, name):
    monkeypatch.setenv(name, "2 minutes")
    store = tmp_path / "store"
    assert main(["run", str(SMOKE), "--store", str(store)]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"{name}='2 minutes' is not a number of seconds" in err
    assert not store.exists()


def test_a_spec_file_too_large_to_be_a_spec(tmp_path, capsys):
    big = tmp_path / "big.yaml"
    big.write_text("experiment: x\n" + "# padding\n" * 120_000)
    assert main(["validate", str(big)]) == 2
    assert "is 1,200,014 bytes long" in capsys.readouterr().err


def test_an_unreadable_token_file(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "gone"))
    assert main(["status", "--address", "http://127.0.0.1:1"]) == 2
    err = capsys.readouterr().err
    assert "RAY_AUTH_TOKEN_PATH" in err and "cannot be read" in err


@pytest.mark.parametrize("extra", [["--address", "auto"], ["--num-cpus", "2"]])
def test_inline_refuses_the_ray_options(tmp_path, capsys, extra):
    """--inline runs without Ray: an address or a CPU count for Ray is a mistake, said before anything runs."""
    store = tmp_path / "store"
    assert main(["run", str(SMOKE), "--store", str(store), "--inline", *extra]) == 2
    err = capsys.readouterr().err
    assert "--inline runs every task in this process, without Ray" in " ".join(err.split())
    assert "--address and --num-cpus" in " ".join(err.split())
    assert not store.exists()
