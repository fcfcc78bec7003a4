"""The review page of a batch: `OUT/review.html`, one self-contained file that opens offline, with no server and no
JavaScript.

It is rebuilt from the records on disk (`OUT/.lungseg/*.json`) at the end of every run, like `results.csv`, so it
covers every finished input in the folder: earlier runs of a resumed batch and every `--shard` job writing there.
It holds a summary (how many results are ok, to check, or failed; the distribution of the predicted quality, as an
inline SVG histogram with the threshold; the most frequent reasons), the failed inputs, and a thumbnail per result
(`OUT/.lungseg/thumbs/`), the flagged ones first and the lowest quality first within each group, each with its
quality, reasons and areas, linked to its full-size overlay (when `--overlays` made one) and its labelmap.
"""

from __future__ import annotations

import html
import os
import time
from collections import Counter
from pathlib import Path
from urllib.parse import quote

from ..io.files import write_atomic_text

REVIEW_PAGE = "review.html"
MAX_OK_SHOWN = 500  # ok results shown (the lowest quality first); every result stays in results.csv
MAX_FLAGGED_SHOWN = 5000  # flagged results shown
HISTOGRAM_LOW = 0.5  # the histogram spans [0.5, 1] in BIN steps, with everything below 0.5 in one bar
BIN = 0.02

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:1.5em;color:#222;background:#fafafa}
h1{margin:0 0 .2em}h2{margin-top:1.6em;border-bottom:1px solid #ccc}
.meta{color:#555;margin:0 0 1em}
table.counts td,table.counts th{padding:.2em .8em;text-align:right}
table.errors{border-collapse:collapse}table.errors td{padding:.2em .6em;border-bottom:1px solid #ddd;vertical-align:top}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure.case{margin:0;width:210px;background:#fff;border:1px solid #ccc;border-radius:4px;padding:6px;font-size:12px}
figure.case.check{border:2px solid #d55e00}
figure.case img{display:block;max-width:198px;max-height:198px;margin:0 auto;background:#000}
figure.case figcaption{margin-top:4px;word-wrap:break-word}
.q{font-weight:bold}.check .q{color:#d55e00}.reasons{color:#8a3b00}.missing{color:#999}
.note{color:#555;font-style:italic}
"""


def _number(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _link(out_dir: Path, path: str | None, inside: str = "") -> str | None:
    """The href of an output of this folder (relative to the page), or None when it is not on disk. Records hold
    the paths as the run was given them; only the file name (and `inside`, a subfolder) is trusted."""
    if not path:
        return None
    relative = f"{inside}/{Path(path).name}" if inside else Path(path).name
    return quote(relative) if (out_dir / relative).exists() else None


def _areas(row: dict) -> str:
    right, left = _number(row.get("right_area_mm2")), _number(row.get("left_area_mm2"))
    if right is not None and left is not None:
        return f"right {right / 100:.1f} cm², left {left / 100:.1f} cm²"
    right, left = _number(row.get("right_area_px")), _number(row.get("left_area_px"))
    if right is not None and left is not None:
        return f"right {int(right):,} px, left {int(left):,} px (spacing unknown)"
    return ""


def review_order(rows: list[dict]) -> list[dict]:
    """Segmented results as the page shows them: flagged first, then ok; lowest quality first in each group
    (a result without a quality first), then by input."""
    done = [r for r in rows if r.get("status") == "ok"]

    def key(r):
        q = _number(r.get("quality"))
        return (r.get("qc") != "check", -1.0 if q is None else q, r.get("input", ""))

    return sorted(done, key=key)


def _histogram_svg(qualities: list[float], threshold: float | None, width: int = 560, height: int = 150) -> str:
    """An inline SVG bar chart of the predicted quality; bars below the threshold in orange."""
    edges = [0.0] + [round(HISTOGRAM_LOW + k * BIN, 4) for k in range(round((1 - HISTOGRAM_LOW) / BIN) + 1)]
    counts = [0] * (len(edges) - 1)
    for q in qualities:
        k = next((i for i in range(len(counts)) if q < edges[i + 1]), len(counts) - 1)
        counts[k] += 1
    top = max(counts) or 1
    left, bottom, bar = 36, 22, (width - 40) / len(counts)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
        f'aria-label="histogram of the predicted quality">'
    ]
    for i, count in enumerate(counts):
        h = (height - bottom - 8) * count / top
        x = left + i * bar
        label = f"&lt; {HISTOGRAM_LOW}" if i == 0 else f"{edges[i]:.2f}-{edges[i + 1]:.2f}"
        low = threshold is not None and edges[i + 1] <= threshold + 1e-9
        colour = "#d55e00" if low else "#009e73"
        parts.append(
            f'<rect x="{x:.1f}" y="{height - bottom - h:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" '
            f'fill="{colour}"><title>quality {label}: {count}</title></rect>'
        )
    for i in range(0, len(edges), 5):
        x = left + i * bar
        text = "0" if i == 0 else f"{edges[i]:.1f}"
        parts.append(f'<text x="{x:.1f}" y="{height - 6}" font-size="10" text-anchor="middle">{text}</text>')
    parts.append(f'<text x="2" y="12" font-size="10">{top}</text>')
    if threshold is not None and threshold >= HISTOGRAM_LOW:
        x = left + (1 + (threshold - HISTOGRAM_LOW) / BIN) * bar
        parts.append(
            f'<line x1="{x:.1f}" y1="4" x2="{x:.1f}" y2="{height - bottom}" stroke="#222" '
            f'stroke-dasharray="3,2"><title>threshold {threshold:.3f}</title></line>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _case(row: dict, out_dir: Path) -> str:
    name = Path(row.get("input", "")).name
    quality = _number(row.get("quality"))
    thumb = _link(out_dir, row.get("thumbnail"), os.path.join(".lungseg", "thumbs"))
    overlay = _link(out_dir, row.get("overlay"))
    labelmap = _link(out_dir, row.get("output"))
    qc = row.get("qc", "")
    picture = (
        f'<img src="{thumb}" alt="{html.escape(name)}" loading="lazy">'
        if thumb
        else '<span class="missing">no thumbnail</span>'
    )
    if overlay or thumb:
        picture = f'<a href="{overlay or thumb}">{picture}</a>'
    links = [f'<a href="{labelmap}">labelmap</a>' if labelmap else '<span class="missing">labelmap missing</span>']
    if overlay:
        links.append(f'<a href="{overlay}">overlay</a>')
    reasons = html.escape(row.get("qc_reasons") or "")
    return (
        f'<figure class="case {html.escape(qc)}" data-quality="{"" if quality is None else quality}" '
        f'data-qc="{html.escape(qc)}">{picture}<figcaption><b title="{html.escape(row.get("input", ""))}">'
        f'{html.escape(name)}</b><br><span class="q">quality {"n/a" if quality is None else f"{quality:.3f}"}'
        f" · {html.escape(qc)}</span>"
        + (f'<br><span class="reasons">{reasons}</span>' if reasons else "")
        + f"<br>{html.escape(_areas(row))}<br>{' · '.join(links)}</figcaption></figure>"
    )


# size: the review page's HTML, CSS and script as one template, in page order
def review_html(rows: list[dict], out_dir: Path, threshold: float | None = None) -> str:
    out_dir = Path(out_dir)
    ordered = review_order(rows)
    flagged = [r for r in ordered if r.get("qc") == "check"]
    ok = [r for r in ordered if r.get("qc") != "check"]
    errors = sorted((r for r in rows if r.get("status") == "error"), key=lambda r: r.get("input", ""))
    skipped = [r for r in rows if r.get("status") not in ("ok", "error")]
    qualities = [q for q in (_number(r.get("quality")) for r in ordered) if q is not None]
    models = sorted({f"{r.get('model', '')} {r.get('model_version', '')} ({r.get('definition', '')})" for r in ordered})
    reasons = Counter(
        reason.split(" (")[0].split(":")[0]
        for r in flagged
        for reason in (r.get("qc_reasons") or "").split("; ")
        if reason
    )

    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>LungSeg review: {html.escape(out_dir.name)}</title><style>{STYLE}</style></head><body>",
        "<h1>LungSeg review</h1>",
        f'<p class="meta">{html.escape(str(out_dir.resolve()))} · {len(rows)} inputs · '
        f"model {html.escape(', '.join(models) or 'none')} · built {time.strftime('%Y-%m-%d %H:%M:%S')}</p>",
        '<section id="summary"><h2>Summary</h2><table class="counts"><tr><th>ok</th><th>check</th>'
        "<th>error</th>" + ("<th>skipped (no image)</th>" if skipped else "") + "<th>total</th></tr>",
        f'<tr><td id="count-ok">{len(ok)}</td><td id="count-check">{len(flagged)}</td>'
        f'<td id="count-error">{len(errors)}</td>'
        + (f"<td>{len(skipped)}</td>" if skipped else "")
        + f"<td>{len(rows)}</td></tr></table>",
    ]
    if qualities:
        below = sum(q < threshold for q in qualities) if threshold is not None else None
        out.append(
            f"<h3>Predicted quality (predicted Dice) of {len(qualities)} results</h3>"
            + _histogram_svg(qualities, threshold)
            + f'<p class="meta">median {sorted(qualities)[len(qualities) // 2]:.3f}, lowest '
            f"{min(qualities):.3f}"
            + (f"; threshold {threshold:.3f} (from the model card): {below} below" if threshold is not None else "")
            + "</p>"
        )
    else:
        out.append('<p class="note">No predicted quality: the model card has no fitted qc block.</p>')
    if reasons:
        out.append(
            "<h3>Why results were flagged</h3><ul>"
            + "".join(f"<li>{html.escape(reason)}: {count}</li>" for reason, count in reasons.most_common(10))
            + "</ul>"
        )
    out.append("</section>")
    if errors:
        out.append(
            f'<section id="errors"><h2>Failed ({len(errors)})</h2><table class="errors">'
            + "".join(
                f"<tr><td>{html.escape(r.get('input', ''))}</td><td>{html.escape(r.get('error', ''))}</td></tr>"
                for r in errors
            )
            + "</table></section>"
        )
    for section, title, group, cap in (
        ("flagged", "To check", flagged, MAX_FLAGGED_SHOWN),
        ("ok", "OK", ok, MAX_OK_SHOWN),
    ):
        out.append(f'<section id="{section}"><h2>{title} ({len(group)}), lowest quality first</h2>')
        if len(group) > cap:
            out.append(f'<p class="note">The {cap} lowest of {len(group)} are shown; results.csv lists all.</p>')
        out.append('<div class="grid">' + "".join(_case(r, out_dir) for r in group[:cap]) + "</div></section>")
    out.append("</body></html>\n")
    return "\n".join(out)


def write_review(rows: list[dict], out_dir: str | Path) -> Path:
    """Write `OUT/review.html` (atomically) for these rows (every record of the folder). The histogram's threshold
    line is the one the rows were flagged with (`qc_threshold`, from the model card's `qc` block)."""
    out_dir = Path(out_dir)
    thresholds = Counter(t for t in (_number(r.get("qc_threshold")) for r in rows) if t is not None)
    path = out_dir / REVIEW_PAGE
    write_atomic_text(review_html(rows, out_dir, thresholds.most_common(1)[0][0] if thresholds else None), path)
    return path
