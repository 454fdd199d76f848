"""The HTML report on the synthetic store of test_findings (with retrained pairs, 2 replicates each): one file
that references nothing outside itself, whose every image decodes as a PNG, and that carries every finding's
sentence; the figures' data (panels with standard errors, trend points) are checked against the store."""
from __future__ import annotations

import html
import re
from html.parser import HTMLParser

import pytest
from test_findings import DEPTHS, SEEDS, TESTS, TRAIN, WDS, build_store

from jobs.findings import findings
from jobs.findings_text import finding_sentence
from jobs.html_report import (
    MAX_PANELS,
    cell_rows,
    embedded_images,
    scatter_panels,
    trend_points,
    write_html,
)
from storage.query import connect

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    store = build_store(tmp_path_factory.mktemp("htmlstore"), pairs=True, methods=("exact", "cg"))
    con = connect(store, "find")
    found = findings(con)
    path = write_html(con, "find", tmp_path_factory.mktemp("out") / "report.html", findings=found)
    yield con, found, path, path.read_text(encoding="utf-8")
    con.close()


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs, self.tags, self.text = [], set(), []

    def handle_starttag(self, tag, attrs):
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href", "srcset", "data", "action", "poster"):
                self.refs.append((tag, name, value or ""))

    def handle_data(self, data):
        self.text.append(data)


def test_the_report_references_nothing_outside_itself(report):
    _, _, _, text = report
    parser = _Refs()
    parser.feed(text)
    assert parser.refs, "the report has figures"
    for tag, name, value in parser.refs:
        assert value.startswith("data:image/png;base64,"), (tag, name, value[:60])
    assert not {"script", "link", "iframe", "object", "embed"} & parser.tags
    assert not re.search(r"url\(|@import|https?://", text.split("<body>")[0])  # the inline style sheet


def test_every_embedded_image_is_a_valid_png(report):
    _, _, path, text = report
    images = embedded_images(text)
    assert len(images) == text.count("<img ") == 4  # scatter, depth, spread, covariates; no width figure
    for data in images:
        assert data[:8] == PNG
    try:
        from PIL import Image
    except ImportError:
        return
    import io

    for data in images:
        Image.open(io.BytesIO(data)).verify()
    assert path.stat().st_size < 2_000_000


def test_findings_sentences_and_what_is_left_out_are_in_the_report(report):
    _, found, _, text = report
    parser = _Refs()
    parser.feed(text)
    words = html.unescape("".join(parser.text))
    assert found
    for f in found:
        assert finding_sentence(f) in words
    assert "Left out of every figure and mean: 13 cell(s) (12 collapsed, 1 diverged" in words
    assert "No width figure" in words  # width does not vary: said, not drawn
    assert "group: not answered; it needs group removals" in words and "depth: not answered" not in words
    n_cells = len(SEEDS) * len(DEPTHS) * len(WDS) * TESTS
    assert f"{n_cells // TESTS} configuration(s), {n_cells * 2} cell(s)" in words
    assert "more cell(s) not shown (at most 24 panels)" in words


def test_scatter_panels_are_replicate_means_with_standard_errors(report):
    con = report[0]
    panels, counts = scatter_panels(con, "exact")
    assert len(panels) == MAX_PANELS
    valid = len(SEEDS) * len(DEPTHS) * len(WDS) * TESTS - 7
    assert counts == {"over_limit": valid - MAX_PANELS, "no_pairs": 0, "left_out": 7}
    p = panels[0]
    assert len(p["estimate"]) == len(p["actual"]) == TRAIN and set(p["replicates"]) == {2}
    cid, t = p["config_id"], p["test_idx"]
    (mean, se), = con.execute("""select avg(actual), stddev_samp(actual) / sqrt(2) from retrain
                                 where config_id = $c and test_idx = $t and removed = 0""",
                              {"c": cid, "t": t}).fetchall()
    assert p["actual"][0] == pytest.approx(mean) and p["se"][0] == pytest.approx(se)
    assert p["label"].startswith("mlp d1 w5") and "ρ" not in p["label"]
    # every valid configuration gets a panel before any gets a second one; the collapsed one gets none
    shown = [q["config_id"] for q in panels]
    assert len(set(shown)) == len(SEEDS) * len(DEPTHS) * len(WDS) - 1 == len(shown) - 1
    assert "d4s2wd0" not in shown
    # cg has no retrain rows of its own but shares the ground truth: its panels exist too
    assert scatter_panels(con, "cg")[0]


def test_trend_points_pool_seeds_with_t_intervals(report):
    con = report[0]
    points = trend_points(cell_rows(con), "depth", "width")
    exact = {(p["wd"], p["x"]): p for p in points if p["method"] == "exact"}
    assert set(exact) == {(wd, d) for wd in WDS for d in DEPTHS}
    p = exact[(0.0, 1)]
    assert p["mean"] == pytest.approx(0.7 - 0.1, abs=0.02) and p["lo"] < p["mean"] < p["hi"]
    assert p["interval"] == "t over 3 seeds" and p["ceiling"] == pytest.approx(0.9)
    assert p["null95"] == pytest.approx(0.4)
    assert exact[(0.0, 4)]["n_cells"] == 2 * TESTS  # the collapsed seed is left out
