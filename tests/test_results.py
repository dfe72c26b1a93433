"""The numbers in docs/reproduction.md come from the runs archived in results/: each documented
suite's report is written again from the archive alone (no training, no checkpoint), and every
row of its main table and of its "read together" table must be in the docs as the report
writes it."""

from pathlib import Path

import pytest

from moma_jax.commands.compare import main

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results"
DOCS = REPO / "docs" / "reproduction.md"
# suite -> the seeds docs/reproduction.md reports from results/
DOCUMENTED = {"paper_micro": 3, "paper_tiny": 5}


def _table(report: str, header: str = "| experiment |") -> list[str]:
    """The rows of report.md's first table whose header starts with `header` (by default the
    main table: experiment x modality)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return rows


@pytest.mark.parametrize("suite,seeds", sorted(DOCUMENTED.items()))
def test_documented_tables_are_the_archived_runs_reports(suite, seeds, tmp_path, capsys):
    root = tmp_path / "root"
    argv = ["--suite", suite, "--seeds", str(seeds), "--root", str(root)]
    assert main([*argv, "--archive", str(RESULTS), "--report-only"]) == 0, capsys.readouterr().err
    report = (root / suite / "report.md").read_text()
    rows = _table(report)
    assert len(rows) >= 3 * 2  # dense and one more experiment, 3 modalities each
    rows += _table(
        report, "| experiment | modality | eta (held-out) | minus dense | resolved | Holm |"
    )
    docs = DOCS.read_text()
    missing = [row for row in rows if row not in docs]
    assert not missing, f"docs/reproduction.md lacks these rows of {suite}'s report: {missing}"
    assert not any(root.glob(f"{suite}/*/seed*"))  # read from the archive, nothing trained
