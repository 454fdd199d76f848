"""The README is true: its cheap shell commands run as written, in its order, in a fresh folder, and the counts it
states match what `fragile validate` says."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()

# Commands cheap enough for the suite: everything but the full studies, installs, test runs and the cluster
# (the cluster workflow has its own end-to-end test in test_run_e2e.py).
CHEAP = re.compile(r"^fragile (validate|query|report|data tiny|run jobs/specs/(iris-smoke|convex-control)\.yaml)\b")
# The full Iris study takes about ten minutes: its query examples run on the smoke study, which has the same
# tables and columns (the test says so by substituting the experiment's name, nothing else).
SUBSTITUTE = {"--experiment iris ": "--experiment iris-smoke ", "--experiment iris\n": "--experiment iris-smoke\n"}


def shell_commands(text: str) -> list[str]:
    """Every command of the README's ```bash blocks, in order: comments dropped, a command that continues over
    several lines (an open quote) joined, `a && b` split into its parts."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        pending = ""
        for line in block.splitlines():
            pending = f"{pending}\n{line}" if pending else line
            try:
                words = shlex.split(pending, comments=True)
            except ValueError:  # an open quote: the command goes on
                continue
            if words:
                code = _strip_comment(pending)
                commands += [c.strip() for c in code.split(" && ")]
            pending = ""
    return commands


def _strip_comment(command: str) -> str:
    """The command without its trailing `# ...` comment (a # inside quotes is kept)."""
    in_quote, out = None, []
    for k, ch in enumerate(command):
        if in_quote:
            in_quote = None if ch == in_quote else in_quote
        elif ch in "\"'":
            in_quote = ch
        elif ch == "#" and (k == 0 or command[k - 1].isspace()):
            break
        out.append(ch)
    return "".join(out).rstrip()


def test_commands_are_found():
    commands = shell_commands(README)
    assert commands[0].startswith("pip install") and "fragile run jobs/specs/iris.yaml" in commands
    cheap = [c for c in commands if CHEAP.match(c)]
    assert any(c.startswith("fragile run jobs/specs/iris-smoke.yaml") for c in cheap)
    assert any(c.startswith("fragile query") for c in cheap) and any(c.startswith("fragile validate") for c in cheap)
    assert any(c.startswith("fragile report") for c in cheap) and any(c.startswith("fragile data tiny") for c in cheap)


@pytest.mark.slow
def test_readme_commands_run_as_written(tmp_path):
    """In a fresh folder holding only the specs, each cheap command in the README's order exits with 0."""
    shutil.copytree(ROOT / "jobs" / "specs", tmp_path / "jobs" / "specs")
    fragile = shutil.which("fragile")
    prefix = [fragile] if fragile else [sys.executable, "-m", "fragile"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "COLUMNS": "80"}
    env.pop("FRAGILE_STORE", None)
    ran = []
    for command in shell_commands(README):
        if not CHEAP.match(command):
            continue
        for old, new in SUBSTITUTE.items():
            command = (command + "\n").replace(old, new).rstrip("\n")
        argv = prefix + shlex.split(command)[1:]
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        assert "…" not in proc.stdout, command
        ran.append(command)
    assert len(ran) >= 6, ran


def _validate_counts(spec: str) -> tuple[int, dict[str, int]]:
    import io
    from contextlib import redirect_stdout

    from fragile.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["validate", spec]) == 0
    out = " ".join(buf.getvalue().split())
    configs = int(re.search(r"(\d+) configurations", out).group(1))
    tasks = {k: int(v) for k, v in re.findall(r"(train|influence|retrain) (\d+)", out.split("tasks:")[1])}
    return configs, tasks


@pytest.mark.parametrize("study", ["iris", "digits"])
def test_counts_the_readme_states_are_what_validate_says(study, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    configs, tasks = _validate_counts(str(ROOT / "jobs" / "specs" / f"{study}.yaml"))
    stated = re.findall(rf"jobs/specs/{study}\.yaml`?: (\d+) configurations, ([\d,]+)\s+tasks", README)
    assert stated, f"the README states no counts for {study}.yaml"
    for n_configs, n_tasks in stated:
        assert (int(n_configs), int(n_tasks.replace(",", ""))) == (configs, sum(tasks.values()))
