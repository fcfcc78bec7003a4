"""The documentation's numbers are the shipped files': the QC tables and the README's QC summary are the cards', the
model tables' validation Dice are the cards', the extension README's weights size is the shipped weights', and every
relative link of the Markdown files points to a file (and a heading) that exists."""

from __future__ import annotations

import re

import pytest
from conftest import REPO, load_script

from lungseg.models.cards import PACKAGE_MODELS, read_card

SHIPPED = sorted(p.stem for p in PACKAGE_MODELS.glob("*.json"))
README = REPO / "README.md"
DOCS = REPO / "LungSegCore" / "docs"
QC_RECORD = DOCS / "quality-control.md"
MODELS_RECORD = DOCS / "models.md"
EXTENSION_README = REPO / "LungSegExtension" / "README.md"
MARKDOWN = [README, REPO / "LungSegCore" / "README.md", EXTENSION_README, *sorted(DOCS.glob("*.md"))]


def flat(path) -> str:
    """A Markdown file's text with its line breaks as spaces, so that a sentence can be found across lines."""
    return " ".join(path.read_text(encoding="utf-8").split())


def test_the_qc_tables_in_the_qc_record_and_the_readme_summary_are_the_cards():
    """The QC tables are what `fit_quality.py --table` prints from the shipped cards, so a refitted card cannot leave
    stale numbers behind: the QC record's (`LungSegCore/docs/quality-control.md`) per card in the default mode, per
    data set on the held-out half, and both directions added; and the README's one-line summary of COVID-QU-Ex in
    the default mode, which is that last table's row."""
    fit_quality = load_script("fit_quality")
    record = QC_RECORD.read_text(encoding="utf-8").splitlines()
    per_card = [line for line in record if line.startswith("| ") and "(threshold " in line]
    printed = fit_quality.markdown_table(SHIPPED).splitlines()
    assert per_card == [row for row in printed if "| default (threshold" in row]
    per_set = fit_quality.dataset_table(SHIPPED).splitlines()[2:]  # each model under its own card
    assert per_set and all(row in record for row in per_set)
    both = fit_quality.both_directions_table(SHIPPED).splitlines()[2:]  # and with the halves swapped added
    assert both and all(row in record for row in both)

    covid = next(row.split(" | ") for row in both if row.startswith("| covid-qu-ex | default |"))
    flagged, recall = re.fullmatch(r"(\d+) \(([\d.]+)\)", covid[5]).groups()
    summary = (
        f"it flags {flagged} of {covid[4]} failures (Dice < 0.90; recall {recall}) at "
        f"{covid[6].rstrip('%')} % false flags"
    )
    assert summary in flat(README), summary


def val_dice_cells(path) -> dict[str, str]:
    """The model tables' rows: model name -> its validation Dice cell (the table whose header has 'val Dice')."""
    rows, header = {}, None
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|"):
            header = None
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if header is None:
            header = cells
        elif any(c.startswith("val Dice") for c in header) and (name := re.match(r"`([\w-]+)`", cells[0])):
            rows[name.group(1)] = cells[next(i for i, c in enumerate(header) if c.startswith("val Dice"))]
    return rows


VAL_SETS = {"JSRT": "jsrt/val", "COVID-QU-Ex": "covid-qu-ex/val", "v7-full": "v7-full/val"}


@pytest.mark.parametrize("path", [README, MODELS_RECORD], ids=["README", "models.md"])
def test_the_model_tables_are_the_cards(path):
    """Every shipped model has a row, and each validation Dice it states (both lungs, and right / left where given)
    is the card's mean, rounded as printed."""
    cells = val_dice_cells(path)
    assert sorted(cells) == SHIPPED
    for name, cell in cells.items():
        metrics = read_card(name)["metrics"]
        stated = re.findall(r"(JSRT|COVID-QU-Ex|v7-full) \**(\d\.\d+)\**(?: \((\d\.\d+) / (\d\.\d+)\))?", cell)
        assert {s[0] for s in stated} == {key for key, split in VAL_SETS.items() if split in metrics}, (name, cell)
        for data_set, both, right, left in stated:
            split = metrics[VAL_SETS[data_set]]
            for region, value in (("both", both), ("right", right), ("left", left)):
                if value:
                    digits = len(value.split(".")[1])
                    assert round(split[f"{region}_dice"]["mean"], digits) == float(value), (name, data_set, region)


def test_readme_states_the_shipped_weights_size():
    """The extension README's sizes of the bundled weights and of the ONNX graphs that read them are the sizes of
    the shipped files."""
    readme = EXTENSION_README.read_text(encoding="utf-8")
    for suffix, words in ((".onnx", "ONNX graphs in all"), (".safetensors", "weights")):
        megabytes = sum(p.stat().st_size for p in PACKAGE_MODELS.glob(f"*{suffix}")) / 1e6
        stated = re.search(rf"~([\d.]+) MB\s+of {words}", readme)
        assert stated and float(stated.group(1)) == pytest.approx(megabytes, abs=0.05), suffix


def heading_anchors(path) -> set[str]:
    """GitHub's anchors of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    anchors, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        fenced ^= line.startswith("```")
        if not fenced and (heading := re.match(r"#{1,6} (.+)", line)):
            anchors.add(re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-"))
    return anchors


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_point_to_existing_files_and_headings(path):
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for target, anchor in re.findall(r"\]\(([^)\s#]*)(?:#([^)\s]+))?\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        linked = (path.parent / target).resolve() if target else path
        assert linked.exists(), f"{path.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in heading_anchors(linked), f"{path.name} links to {target}#{anchor}: no such heading"


def percent(value: float, digits: int) -> str:
    return f"{100 * value:.{digits}f} %"


def test_the_orientation_tables_are_the_study_and_the_card():
    """The README's orientation table and orientation.md's held-out table are `orientation-study.json`'s and the
    orientation card's numbers."""
    import json

    from lungseg.models.cards import ORIENTATION_CARD

    study = json.loads((DOCS / "orientation-study.json").read_text())["sets"]
    covid, readme = study["covid-qu-ex"], flat(README)
    mirrored = ("mirrored", "mirrored + rotated 90")
    silent = sum(covid[copy]["silent_swaps"] for copy in mirrored)
    exact = sorted(covid[copy]["recognised"] for copy in mirrored)
    undone = sorted(
        covid[copy]["turn_and_inversion_corrected"] for copy in ("rotated 90", "rotated 180", "rotated 270", "inverted")
    )
    row = (
        f"| COVID-QU-Ex val + test, 932 | {percent(1 - covid['stored']['recognised'], 2)} | "
        f"{100 * undone[0]:.1f}–{percent(undone[-1], 1)} | {100 * exact[0]:.1f}–{percent(exact[-1], 1)} | "
        f"{silent} of 1,864 mirrored copies |"
    )
    assert row in readme, row
    assert study["non-chest"]["corrected"] == 0 and study["non-chest"]["qc_check"] == study["non-chest"]["copies"]
    held_out = json.loads(ORIENTATION_CARD.read_text())["heldout"]["covid-qu-ex"]
    row = (
        f"| COVID-QU-Ex val + test | 932 | {percent(held_out['stored_called_changed'], 2)} | "
        f"{percent(held_out['stored_flagged'], 1)} | {percent(held_out['mirrored_recognised'], 1)} | "
        f"{percent(held_out['turned_corrected'], 1)} | {percent(held_out['inverted_corrected'], 1)} | "
        f"{held_out['silent_swaps']} of 7,456 |"
    )
    assert row in flat(DOCS / "orientation.md"), row
