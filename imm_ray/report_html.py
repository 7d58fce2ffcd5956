"""report.html: the run's report.md as one self-contained page (plots embedded as base64 PNG, no external files).

The page is the markdown rendered by markdown-it (the parser rich itself uses), every local image replaced by a
``data:`` URI, and a small inline style sheet: the summary sentence stands out at the top, tables are compact with
right-aligned numbers, figures fit the page width. Nothing is fetched: no script, font or style from elsewhere.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px; margin: 1.5em auto;
       padding: 0 1em; color: #1b1f24; line-height: 1.45; font-size: 15px; }
h1 { font-size: 1.6em; margin-bottom: 0.3em; }
h2 { font-size: 1.25em; border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; margin-top: 1.6em; }
h3 { font-size: 1.05em; }
h2#summary + p { background: #eef6ff; border-left: 4px solid #2f6feb; padding: 0.7em 1em; font-size: 1.08em; }
blockquote { color: #57606a; border-left: 3px solid #d0d7de; margin: 0.8em 0; padding: 0 0.9em; font-size: 0.9em; }
table { border-collapse: collapse; margin: 0.6em 0 1em; font-size: 0.88em; }
th, td { border: 1px solid #d0d7de; padding: 0.25em 0.6em; }
th { background: #f6f8fa; }
td { font-variant-numeric: tabular-nums; white-space: nowrap; }
tr:nth-child(even) td { background: #fbfcfd; }
img { max-width: min(100%, 920px); height: auto; border: 1px solid #eaeef2; display: block; }
code { background: #f6f8fa; padding: 0 0.25em; border-radius: 3px; }
"""

_IMAGE = re.compile(r'<img src="([^"]+)"')


def render(markdown: str, folder: Path, title: str) -> str:
    """The page for ``markdown`` whose images are files relative to ``folder``."""
    from markdown_it import MarkdownIt

    parser = MarkdownIt("commonmark", {"html": False}).enable("table")
    body = parser.render(markdown)
    body = re.sub(r"<h2>Summary</h2>", '<h2 id="summary">Summary</h2>', body, count=1)
    body = _IMAGE.sub(lambda match: f'<img src="{_data_uri(folder, html.unescape(match.group(1)))}"', body)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n")


def _data_uri(folder: Path, source: str) -> str:
    """A local PNG as a data URI; anything else (a missing file, a URL) becomes an empty image, never a link."""
    path = folder / source
    if "://" in source or not path.is_file() or path.suffix.lower() != ".png":
        return "data:,"
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def write_html(path: Path, markdown: str, folder: Path, title: str) -> Path:
    path.write_text(render(markdown, folder, title), encoding="utf-8")
    return path
