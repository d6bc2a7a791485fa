"""What an experiment leaves behind: NAME.csv, NAME.json, NAME.png and NAME.md in one folder."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rocoin.contracts.fileio import atomic_path, write_json_atomic, write_text_atomic


@dataclass
class ExperimentResult:
    """The numbers of one experiment, how to plot them, and what they say.

    ``rows`` (a list of flat dicts with the same keys) becomes the CSV and the Markdown table;
    ``caption`` states the assumptions and goes under the plot and into the report;
    ``findings`` are the lines comparing the result with the paper's claim.
    """

    name: str
    title: str
    caption: str
    rows: list[dict[str, Any]]
    plot: Callable[[Any], None]
    findings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    table_columns: list[str] | None = None

    def write(self, folder: Path, setup: dict[str, Any], elapsed_s: float) -> dict[str, Path]:
        """Write the four files atomically; returns their paths by kind."""
        folder.mkdir(parents=True, exist_ok=True)
        paths = {kind: folder / f"{self.name}.{kind}" for kind in ("csv", "json", "png", "md")}
        write_text_atomic(paths["csv"], to_csv(self.rows))
        write_json_atomic(
            paths["json"],
            _nan_as_null(
                {
                    "name": self.name,
                    "title": self.title,
                    "caption": self.caption,
                    "setup": setup,
                    "elapsed_s": elapsed_s,
                    "rows": self.rows,
                    "findings": self.findings,
                    **self.extra,
                }
            ),
        )
        self._write_png(paths["png"])
        write_text_atomic(paths["md"], self.markdown(elapsed_s))
        return paths

    def _write_png(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig = plt.figure(figsize=(10, 5.2))
        try:
            self.plot(fig)
            fig.suptitle(self.title, fontsize=11)
            fig.text(0.01, 0.01, self.caption, fontsize=7, wrap=True, va="bottom")
            fig.tight_layout(rect=(0, 0.1, 1, 0.95))
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format="png", dpi=110)
        finally:
            plt.close(fig)

    def markdown(self, elapsed_s: float) -> str:
        lines = [f"## {self.title}", "", f"![{self.name}]({self.name}.png)", "", f"*{self.caption}*", ""]
        lines += markdown_table(self.rows, self.table_columns)
        if self.findings:
            lines += ["", "**Compared with the paper:**", ""] + [f"- {f}" for f in self.findings]
        lines += ["", f"Files: [{self.name}.csv]({self.name}.csv), [{self.name}.json]({self.name}.json); took {elapsed_s:.1f} s.", ""]
        return "\n".join(lines)


def fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10000 else str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "–"
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str] | None = None) -> list[str]:
    if not rows:
        return ["(no rows)"]
    columns = columns or all_columns(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) if c in r else "" for c in columns) + " |" for r in rows]
    return lines


def all_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Every key of ``rows``, in the order first seen."""
    return list(dict.fromkeys(key for row in rows for key in row))


def to_csv(rows: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    if rows:
        writer = csv.DictWriter(buffer, fieldnames=all_columns(rows), restval="", lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return buffer.getvalue()


def _nan_as_null(value: Any) -> Any:
    """NaN (a setting where no fleet was feasible) as JSON null: JSON has no NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _nan_as_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nan_as_null(v) for v in value]
    return value
