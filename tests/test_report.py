"""report.py: Markdown tables, atomic JSON, and hand-written SVG charts that parse as XML."""
import json
import math
import os
import xml.etree.ElementTree as ET

import pytest

import report

SVG = "{http://www.w3.org/2000/svg}"


def texts(root):
    return ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def test_markdown_table_exact_and_default_alignment():
    out = report.markdown_table(["lang", "EMT", "n"], [["en", 0.51234, 3], ["a|b", float("nan"), 4]])
    assert out == ("| lang | EMT | n |\n"
                   "|:---|---:|---:|\n"
                   "| en | 0.512 | 3 |\n"
                   "| a\\|b | nan | 4 |\n")


def test_markdown_table_explicit_align_and_bad_shape():
    assert "|:---:|" in report.markdown_table(["x"], [["y"]], align=["c"])
    with pytest.raises(ValueError, match="2 columns"):
        report.markdown_table(["a", "b"], [["only one"]])


def test_write_json_atomic_strict_and_overwrites(tmp_path):
    path = tmp_path / "sub" / "m.json"
    report.write_json(path, {"a": float("nan"), "b": [1.5, float("inf")], "c": "ü"})
    report.write_json(path, {"a": float("nan"), "b": [2.5, float("inf")], "c": "ü"})
    text = path.read_text(encoding="utf-8")
    assert json.loads(text) == {"a": None, "b": [2.5, None], "c": "ü"}
    assert os.listdir(path.parent) == ["m.json"]  # no temp file left behind


def test_nice_ticks_cover_range_with_round_steps():
    ticks = report.nice_ticks(0.0, 0.87)
    assert ticks[0] <= 0.0 and ticks[-1] >= 0.87
    steps = {round(b - a, 9) for a, b in zip(ticks, ticks[1:])}
    assert steps == {0.2}


def test_bar_chart_parses_escapes_and_skips_nan():
    svg = report.bar_chart_svg(["en", "<de&>"], {"before": [0.5, 0.4], "after": [0.1, float("nan")]},
                               'EMT "before" & <after>', "EMT")
    root = ET.fromstring(svg)
    bars = [r for r in root.iter(f"{SVG}rect") if r.find(f"{SVG}title") is not None]
    assert len(bars) == 3  # the NaN bar is left out
    assert 'EMT "before" & <after>' in texts(root) and "<de&>" in texts(root)
    assert {"before", "after"} <= set(texts(root))  # legend
    heights = sorted(float(r.get("height")) for r in bars)
    assert heights[0] < heights[1] < heights[2]  # 0.1 < 0.4 < 0.5
    with pytest.raises(ValueError, match="expected 2"):
        report.bar_chart_svg(["en", "de"], {"x": [1.0]}, "t", "y")


def test_bar_chart_handles_negative_values_and_long_labels():
    svg = report.bar_chart_svg(["a very long category", "b"], {"change": [-20.0, 35.0]}, "change", "%")
    root = ET.fromstring(svg)
    assert any("rotate(-45" in (t.get("transform") or "") for t in root.iter(f"{SVG}text"))


def test_line_chart_parses():
    svg = report.line_chart_svg([0, 1, 2], {"loss": [0.7, 0.5, 0.4], "acc": [0.5, 0.6, float("nan")]},
                                "DPO", "step", "value")
    root = ET.fromstring(svg)
    assert len(list(root.iter(f"{SVG}polyline"))) == 2
    assert len(list(root.iter(f"{SVG}circle"))) == 5


def test_linear_fit_known_values():
    slope, intercept, r = report.linear_fit([0.0, 1.0, 2.0], [1.0, 3.0, 5.0])
    assert (slope, intercept) == pytest.approx((2.0, 1.0)) and r == pytest.approx(1.0)
    assert math.isnan(report.linear_fit([1.0, 1.0], [0.0, 2.0])[0])


def test_scatter_parses_with_labels_and_fit():
    svg = report.scatter_svg([0.1, 0.5, 0.9], [0.2, 0.1, 0.5], ["en", "ja", "<zh>"], "R", "retrieval", "drop",
                             fit=True)
    root = ET.fromstring(svg)
    assert {"en", "ja", "<zh>"} <= set(texts(root))
    assert any(t.startswith("fit: y =") and "r = " in t for t in texts(root))
    assert any(l.get("stroke-dasharray") for l in root.iter(f"{SVG}line"))


def test_cli_renders_table_and_chart(tmp_path, capsys):
    src = tmp_path / "m.json"
    src.write_text(json.dumps({"en": {"emt": 0.25, "note": "x"}, "de": {"emt": 0.5}}))
    report.main([str(src), "--svg", str(tmp_path / "c.svg")])
    out = capsys.readouterr().out
    assert "| en | 0.250 |" in out and "| de | 0.500 |" in out
    ET.parse(tmp_path / "c.svg")
    src.write_text(json.dumps({"metrics": {"en": {"emt": 0.125}}}))
    report.main([str(src), "--select", "metrics"])
    assert "| en | 0.125 |" in capsys.readouterr().out
    with pytest.raises(ValueError, match="no field 'after'"):
        report.main([str(src), "--select", "after"])


def test_bar_chart_draws_intervals():
    svg = report.bar_chart_svg(["en", "de"], {"before": [0.5, 0.4]}, "t", "y",
                               errors={"before": [(0.4, 0.6), None]})
    root = ET.fromstring(svg)
    whiskers = [e for e in root.iter(f"{SVG}path") if e.get("class") == "interval"]
    assert len(whiskers) == 1  # the bar without an interval gets none
    with pytest.raises(ValueError, match="expected 2"):
        report.bar_chart_svg(["en", "de"], {"x": [1.0, 2.0]}, "t", "y", errors={"x": [(0, 1)]})
