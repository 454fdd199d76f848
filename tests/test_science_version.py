"""The science stamp: a hash of the science sources, changed by any edit to them and by nothing else."""
from __future__ import annotations

import shutil

from jobs import science


def _copy_sources(tmp_path):
    for name in science.SCIENCE_SOURCES + ("fragile/cli.py", "README.md"):
        src = science.ROOT / name
        dst = tmp_path / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, dst)
    return tmp_path


def test_stamp_is_the_hash_of_the_science_sources(tmp_path, monkeypatch):
    root = _copy_sources(tmp_path)
    monkeypatch.setattr(science, "ROOT", root)
    assert science.science_version() == science.SCIENCE  # the copy hashes like the checkout
    assert len(science.SCIENCE) == 12 and int(science.SCIENCE, 16) >= 0


def test_an_edit_to_a_science_file_changes_the_stamp_and_other_files_do_not(tmp_path, monkeypatch):
    root = _copy_sources(tmp_path)
    monkeypatch.setattr(science, "ROOT", root)
    before = science.science_version()
    (root / "jobs" / "cli.py").write_text("# the CLI is not science\n")
    (root / "README.md").write_text("changed\n")
    assert science.science_version() == before
    solver = root / "influence" / "ihvp.py"
    solver.write_text(solver.read_text() + "\n# a changed solver\n")
    changed = science.science_version()
    assert changed != before
    (root / "influence" / "new_method.py").write_text("x = 1\n")  # a new science file counts too
    assert science.science_version() not in (before, changed)


def test_unstamped_parts_are_named_as_such():
    assert science.stamp_of(None) == science.UNSTAMPED and science.stamp_of("abc") == "abc"
