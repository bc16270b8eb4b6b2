"""Re-render reports/embedder-CATALOG.md and its cold-item-path plot from the report's JSON with the code as it is,
without re-running the evaluation (for a change in how the report is drawn, or in the served default it is compared
with). The notes at the top are kept as the run wrote them.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/render_embedder_report.py [CATALOG]
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from eval import embedder_eval as ee


def main(catalog: str = "movielens-100k") -> None:
    stem = Path("reports") / f"embedder-{catalog}"
    report = json.loads(Path(f"{stem}.json").read_text())
    # the notes: the bullet lines right under the title, up to the first line that is not one
    notes = [line[2:] for line in itertools.takewhile(lambda line: line.startswith("- "),
                                                        Path(f"{stem}.md").read_text().splitlines()[2:])]
    ee.write_report(report, notes, stem, f"{stem.name}.png" if Path(f"{stem}.png").exists() else None)


if __name__ == "__main__":
    main(*sys.argv[1:])
