"""The QC tables in the README and the QC record are the cards' (the other QC tests: test_qc_*.py and
test_review.py)."""
from __future__ import annotations

from conftest import load_script
from lungseg.models.cards import PACKAGE_MODELS

SHIPPED = sorted(p.stem for p in PACKAGE_MODELS.glob("*.json"))


def test_the_qc_tables_in_the_readme_and_the_qc_record_are_the_cards():
    """The QC tables are what `fit_quality.py --table` prints from the shipped cards, so a refitted card cannot leave
    stale numbers behind: the README's per data set with both directions added, and the QC record's
    (`LungSegCore/docs/quality-control.md`) per card in the default mode, per data set on the held-out half, and
    both directions again."""
    from conftest import REPO

    fit_quality = load_script("fit_quality")
    readme = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    record = (REPO / "LungSegCore" / "docs" / "quality-control.md").read_text(encoding="utf-8").splitlines()
    per_card = [line for line in record if line.startswith("| ") and "(threshold " in line]
    printed = fit_quality.markdown_table(SHIPPED).splitlines()
    assert per_card == [row for row in printed if "| default (threshold" in row]
    per_set = fit_quality.dataset_table(SHIPPED).splitlines()[2:]  # each model under its own card
    assert per_set and all(row in record for row in per_set)
    both = fit_quality.both_directions_table(SHIPPED).splitlines()[2:]  # and with the halves swapped added
    assert both and all(row in readme for row in both) and all(row in record for row in both)
