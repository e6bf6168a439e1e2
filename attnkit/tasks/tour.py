"""``attnkit tour``: a short run of every capability on the embedded data, gathered in one offline page.

Each task module offers ``tour_section(out_dir, quick) -> Section``; the tour runs them in order, keeps going when
one fails (the failure is shown on the page and the exit status is 1), and writes ``index.html`` into ``--out``.
"""

from __future__ import annotations

import argparse
import html
import importlib
import os
import time
import traceback
from pathlib import Path

from attnkit._argtypes import choice_list, output_dir
from attnkit.tasks.claims import Claim, claims_rows, write_claims
from attnkit.tasks.report import Section

HELP = "run a short version of every capability on the embedded data and write one offline index.html"

# name -> (task module[:function], what the section shows, the docs page with its long runs, the commands that
# made them and the papers' figures); the function is tour_section unless named; the order is the tour's order.
SECTIONS: dict[str, tuple[str, str, str]] = {
    "kernels": ("attnkit.tasks.kernels", "dense kernels, masks, backends and their bench table", "sdpa.md"),
    "long": ("attnkit.tasks.long", "sliding-window, block-sparse and chunked kernels", "long.md"),
    "explain": ("attnkit.tasks.explain", "multi-head attention in a real pretrained MiniLM", "seeing.md"),
    "llm": ("attnkit.tasks.explain:tour_llm_section",
            "a real LLM (SmolLM2) through attn_implementation='attnkit': attention sink, previous-token heads",
            "seeing.md"),
    "classify": ("attnkit.tasks.classify", "SE / ECA / CBAM on real images", "vision.md"),
    "caption": ("attnkit.tasks.caption", "soft vs hard attention captioning digit scenes", "hard.md"),
    "glimpse": ("attnkit.tasks.glimpse", "a recurrent attention model taking glimpses", "hard.md"),
    "translate": ("attnkit.tasks.translate", "translation with and without attention (full: against input length)",
                  "translation.md"),
}

_DOCS_DIR = Path(__file__).resolve().parents[2] / "docs"  # the repository's docs (a source or editable install)


def docs_link(name: str, out_dir: Path) -> tuple[str, str] | None:
    """``(label, href)`` of the section's docs page, relative to the tour's folder; ``None`` where the docs are not
    beside the package (an installed wheel)."""
    doc = SECTIONS[name][2]
    page = _DOCS_DIR / doc
    if not page.is_file():
        return None
    href = Path(os.path.relpath(page, out_dir.resolve())).as_posix()
    return f"the long runs and the papers' figures: docs/{doc}", href


_STYLE = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
h1{margin-bottom:.2em} section{border-top:1px solid #ddd;margin-top:2em;padding-top:1em}
table{border-collapse:collapse;margin:1em 0;font-size:.9em} th,td{border:1px solid #ccc;padding:.3em .6em}
th{background:#f4f4f4} img{max-width:100%;border:1px solid #eee} figure{margin:1em 0}
td.verdict{font-weight:bold;white-space:nowrap}
.time{color:#888;font-size:.8em} .fail{color:#a00} pre{background:#f8f8f8;padding:.5em;overflow:auto}
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=output_dir, default="runs/tour", help="output folder (default runs/tour)")
    parser.add_argument("--quick", action="store_true", help="the CI-sized tour (about 3 minutes on 2 cores)")
    parser.add_argument(
        "--only",
        type=choice_list(SECTIONS, what="sections", example="kernels"),
        default=None,
        help=f"comma-separated sections to run, from: {', '.join(SECTIONS)} (default all)",
    )


def _selected(only: str | list[str] | None) -> list[str]:
    if not only:
        return list(SECTIONS)
    names = [n.strip() for n in only.split(",") if n.strip()] if isinstance(only, str) else list(only)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise ValueError(f"expected sections from {list(SECTIONS)}, got {unknown}; try --only kernels")
    return names


def run_section(name: str, out_dir: Path, quick: bool) -> tuple[Section, bool]:
    """Run one section; a failure becomes a section that shows the error (and ``False``)."""
    target, what, _ = SECTIONS[name]
    module_name, _, function = target.partition(":")
    start = time.perf_counter()
    try:
        module = importlib.import_module(module_name)
        section = getattr(module, function or "tour_section")(out_dir, quick)
        ok = True
    except Exception as err:  # noqa: BLE001 - the tour reports every failure and goes on
        section = Section(f"{name}: failed", f"{what}: {type(err).__name__}: {err}")
        section.table = [["traceback"], *[[line] for line in traceback.format_exc().splitlines()[-8:]]]
        ok = False
    section.seconds = time.perf_counter() - start
    link = docs_link(name, out_dir)
    if link is not None:
        section.links.append(link)
    return section, ok


_VERDICT = ' class="verdict"'


def claims_html(claims: list[Claim]) -> str:
    """The opening table: one row per claim of the tutorial, computed from this run's JSON (claims.json)."""
    head, *rows = claims_rows(claims)
    cells = "".join(f"<th>{html.escape(c)}</th>" for c in head)
    body = "".join(
        "<tr>" + "".join(f"<td{_VERDICT if j == 3 else ''}>{html.escape(c)}</td>" for j, c in enumerate(r))
        + "</tr>"
        for r in rows
    )
    return (
        '<section id="claims"><h2>What the tutorial claims — what this run measured</h2>'
        "<p>Each verdict is computed from the JSON results this run wrote (<a href=\"claims.json\">claims.json</a>) "
        "by the rule in the last column; a section left out of this run reads 'not run'.</p>"
        f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table></section>"
    )


def write_index(
    out_dir: Path, sections: list[Section], quick: bool, total: float, claims: list[Claim] | None = None
) -> Path:
    body = "\n".join(s.to_html() for s in sections)
    if claims is not None:
        body = claims_html(claims) + "\n" + body
    mode = "quick" if quick else "full"
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>attnkit tour</title><style>{_STYLE}</style></head>
<body><h1>attnkit tour</h1>
<p>Every section below was produced by this run ({html.escape(mode)} mode, {total:.0f} s), on data that ships
offline in packages. Pictures and tables sit beside this page; nothing is fetched from the network.</p>
<ul>{"".join(f'<li>{html.escape(s.title)} ({s.seconds:.0f} s)</li>' for s in sections)}</ul>
{body}
</body></html>
"""
    path = out_dir / "index.html"
    path.write_text(page, encoding="utf-8")
    return path


def run(args: argparse.Namespace) -> int:
    names = _selected(args.only)  # before the folder is made: a bad name creates nothing
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    sections: list[Section] = []
    failed: list[str] = []
    start = time.perf_counter()
    for i, name in enumerate(names, 1):
        print(f"[tour {i}/{len(names)}] {name}: {SECTIONS[name][1]}", flush=True)
        section, ok = run_section(name, out_dir, args.quick)
        sections.append(section)
        print(f"[tour {i}/{len(names)}] {name}: {'done' if ok else 'FAILED'} in {section.seconds:.1f} s", flush=True)
        if not ok:
            failed.append(name)
        write_index(out_dir, sections, args.quick, time.perf_counter() - start)  # a partial page survives a crash
    claims = write_claims(out_dir)
    index = write_index(out_dir, sections, args.quick, time.perf_counter() - start, claims)
    print(f"tour written to {index} in {time.perf_counter() - start:.0f} s")
    if failed:
        print(f"failed sections: {', '.join(failed)}")
        return 1
    return 0
