"""The notebook's Dice-over-rounds picture: the numbers it plots and a well-formed SVG."""

from __future__ import annotations

import xml.dom.minidom

from voxgrid.charts import dice_over_rounds, site_series
from voxgrid.reports import RoundResult, SiteResult


def _history():
    def site(node, ds, r, dice, ok=True):
        return SiteResult(node, ds, ok, test_dice=dice if ok else {})

    return [RoundResult(r, [site("node-a", "a<&>", r, {"pancreas": 0.1 * r}),
                            site("node-b", "b", r, {"pancreas": 0.2 * r, "tumor": 0.4 * r if r else None},
                                 ok=r != 1)], 1.0, 1.0, 1.0) for r in range(3)]


def test_series_are_each_sites_mean_over_its_scored_classes_and_skip_unscored_rounds():
    s = site_series(_history())
    assert s["a<&>@node-a"] == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert [r for r, _ in s["b@node-b"]] == [0, 2]  # dropped in round 1: no point, no fake zero
    assert abs(s["b@node-b"][1][1] - 0.6) < 1e-12  # round 2: (0.4 + 0.8) / 2


def test_svg_has_a_line_and_a_point_per_scored_round_and_escapes_names():
    svg = dice_over_rounds(_history())
    doc = xml.dom.minidom.parseString(svg)  # well-formed, so the site name was escaped
    assert len(doc.getElementsByTagName("circle")) == 5
    assert len([p for p in doc.getElementsByTagName("path") if p.getAttribute("class") == "site"]) == 2
    assert "a&lt;&amp;&gt;@node-a" in svg
    assert [t.firstChild.data for t in doc.getElementsByTagName("text") if t.getAttribute("class") == "xtick"] == \
        ["0", "1", "2"]
