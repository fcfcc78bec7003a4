"""The batch's review page (`review.html`): offline links, every input once, flagged and lowest quality first."""

from __future__ import annotations

import os
import shutil

import numpy as np
import SimpleITK as sitk
from helpers import results_rows

from lungseg.samples import sample_pngs


class PageParser:
    """The review page's cases (figure attributes, in page order), links and summary counts, via html.parser."""

    def __init__(self, text):
        from html.parser import HTMLParser

        self.cases, self.links, self.counts = [], [], {}
        page = self

        class Parser(HTMLParser):
            current = None

            def handle_starttag(self, tag, attrs):
                attrs = dict(attrs)
                if tag == "figure":
                    page.cases.append({**attrs, "links": []})
                for key in ("href", "src"):
                    if key in attrs:
                        page.links.append(attrs[key])
                        if page.cases and tag in ("a", "img"):
                            page.cases[-1]["links"].append(attrs[key])
                if tag == "td" and attrs.get("id", "").startswith("count-"):
                    self.current = attrs["id"][6:]
                if tag == "b" and page.cases and "title" in attrs:
                    page.cases[-1]["input"] = attrs["title"]

            def handle_data(self, data):
                if self.current:
                    page.counts[self.current] = int(data)
                    self.current = None

        Parser().feed(text)


def check_page(out, inputs):
    """The page's links all exist, it covers every input once, and shows flagged then lowest quality first."""
    from urllib.parse import unquote

    page = PageParser((out / "review.html").read_text(encoding="utf-8"))
    rows = results_rows(out)
    assert set(rows) == set(inputs)
    for link in page.links:
        assert not link.startswith(("http:", "https:", "/")), f"{link}: the page must work offline, from anywhere"
        assert (out / unquote(link)).is_file(), f"{link} is missing"
    assert sorted(os.path.basename(c["input"]) for c in page.cases) == sorted(
        n for n, r in rows.items() if r["status"] == "ok"
    )
    order = [(c["data-qc"] != "check", float(c["data-quality"])) for c in page.cases]
    assert order == sorted(order), "flagged first, then the lowest quality first"
    for case in page.cases:
        row = rows[os.path.basename(case["input"])]
        assert case["data-qc"] == row["qc"] and float(case["data-quality"]) == float(row["quality"])
        assert any(unquote(link) == os.path.basename(row["output"]) for link in case["links"]), "labelmap link"
        assert any(".lungseg/thumbs/" in unquote(link) for link in case["links"]), "thumbnail"
    statuses = [r["status"] for r in rows.values()]
    assert page.counts == {
        "ok": sum(r["qc"] == "ok" for r in rows.values() if r["status"] == "ok"),
        "check": sum(r["qc"] == "check" for r in rows.values() if r["status"] == "ok"),
        "error": statuses.count("error"),
    }
    return page


def test_review_page_covers_shards_and_resumed_runs(tmp_path):
    from lungseg.batch.run import segment_inputs

    folder = tmp_path / "in"
    folder.mkdir()
    for png in sample_pngs():
        shutil.copy(png, folder / png.name)
    chest = sitk.GetArrayFromImage(sitk.ReadImage(str(sample_pngs()[0])))
    sitk.WriteImage(sitk.GetImageFromArray(np.ascontiguousarray(np.rot90(chest, 2))), str(folder / "upside down.png"))
    (folder / "broken.png").write_bytes(b"not a png")
    inputs = sorted(p.name for p in folder.iterdir())
    out = tmp_path / "out"
    for shard in ("1/2", "2/2"):  # two jobs sharing one output folder, no --overlays
        segment_inputs([str(folder)], out, shard=shard, workers=0)
    page = check_page(out, inputs)
    thumbs = sorted((out / ".lungseg" / "thumbs").iterdir())
    assert len(thumbs) == len(page.cases) == len(inputs) - 1
    assert all(t.read_bytes()[:2] == b"\xff\xd8" and t.stat().st_size < 40_000 for t in thumbs), "small JPEGs"

    again = segment_inputs([str(folder)], out, workers=0)  # a resumed run: only the failed input is retried
    assert (again.done, again.failed, again.skipped) == (1, 1, len(inputs) - 1)
    check_page(out, inputs)

    from lungseg.batch.records import Options, in_shard

    segment_inputs([str(folder)], out, shard="1/2", workers=0, options=Options(overlays=True))
    page = check_page(out, inputs)
    shard1 = {p.name for p in folder.iterdir() if in_shard(p, (1, 2))}
    with_overlay = {
        os.path.basename(c["input"]) for c in page.cases if any(link.endswith("_overlay.png") for link in c["links"])
    }
    assert with_overlay == shard1 - {"broken.png"}, "overlays made by one shard's rerun are linked, no others"
