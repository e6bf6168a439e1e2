"""What a task hands the tour: a titled piece of HTML with links to its tables and pictures."""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from pathlib import Path

from attnkit._table import format_table  # re-exported for old imports

__all__ = ["Section", "format_table"]


@dataclass
class Section:
    """One part of the tour's ``index.html``.

    Args:
        title: heading.
        summary: a sentence or two of plain text (escaped when rendered).
        table: optional rows (first row = header) of plain text cells.
        more_tables: further tables of the same form.
        images: paths of pictures, relative to the tour's output folder.
        links: ``(label, relative path)`` pairs (HTML viewers, JSON results, ...).
        seconds: how long the section took.
    """

    title: str
    summary: str
    table: list[list[str]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    more_tables: list[list[list[str]]] = field(default_factory=list)

    def to_html(self) -> str:
        parts = [f"<section><h2>{html.escape(self.title)}</h2>", f"<p>{html.escape(self.summary)}</p>"]
        for table in [self.table, *self.more_tables]:
            if not table:
                continue
            head, *rows = table
            parts.append("<table><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr></thead>")
            parts.append(
                "<tbody>"
                + "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
                + "</tbody></table>"
            )
        for label, href in self.links:
            parts.append(f'<p><a href="{html.escape(href)}">{html.escape(label)}</a></p>')
        for src in self.images:
            parts.append(
                f'<figure><img src="{html.escape(src)}" alt="{html.escape(Path(src).stem)}" loading="lazy">'
                f"<figcaption>{html.escape(Path(src).name)}</figcaption></figure>"
            )
        parts.append(f'<p class="time">{self.seconds:.1f} s</p></section>')
        return "\n".join(parts)
