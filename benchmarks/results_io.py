"""Shared by the benchmark scripts: write a results file so a crash never leaves half of one,
and print result tables (rich in a terminal, Markdown for the README)."""
from __future__ import annotations

import argparse
import json
import os
import sys
import platform
import subprocess
import tempfile
from typing import Any, Callable, Sequence

#: (title, header, rows of cells)
TableData = tuple[str, list[str], list[list[str]]]


def write_json_atomic(path: str, payload: dict[str, Any]) -> None:
    """Write to a temporary file beside `path`, then os.replace it into place."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, suffix=".tmp") as handle:
        json.dump(payload, handle, indent=2, default=str)
        handle.write("\n")
    os.replace(handle.name, path)


def print_tables(tables: list[TableData], left: Sequence[str], width: int = 160) -> None:
    """Rich tables when rich is installed, plain Markdown otherwise; columns named in `left` align left."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(markdown_tables(tables, left))
        return
    console = Console(width=max(Console().width, width))
    for title, header, body in tables:
        table = Table(title=title)
        for name in header:
            table.add_column(name, justify="left" if name in left else "right")
        for line in body:
            table.add_row(*line)
        console.print(table)


def markdown_tables(tables: list[TableData], left: Sequence[str]) -> str:
    """The tables as Markdown, for pasting into benchmarks/README.md."""
    out = []
    for title, header, body in tables:
        rule = "|".join(":---" if name in left else "---:" for name in header)
        out += [f"**{title}**\n", "| " + " | ".join(header) + " |", f"|{rule}|"]
        out += ["| " + " | ".join(line) + " |" for line in body] + [""]
    return "\n".join(out)


def machine_info(repo: str) -> dict[str, Any]:
    """Platform, Python, CPU count and the commit of `repo` (None outside a git checkout)."""
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "nproc": os.cpu_count()}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                                        timeout=30, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info


def add_output_arguments(parser: argparse.ArgumentParser, default_out: str) -> None:
    """--out (where the JSON goes), --report (print a saved result instead of running), --markdown."""
    parser.add_argument("--out", default=default_out, help="JSON results path (written atomically)")
    parser.add_argument("--report", metavar="JSON", help="print the tables of a saved result instead of running")
    parser.add_argument("--markdown", action="store_true", help="print the tables as Markdown")


def run_or_report(args: argparse.Namespace, run: Callable[[], dict[str, Any]],
                  render: Callable[[dict[str, Any]], list[TableData]], left: Sequence[str]) -> dict[str, Any]:
    """The payload of a fresh run (written to --out) or of the saved --report, its tables printed."""
    if args.report:
        with open(args.report) as handle:
            payload = json.load(handle)
    else:
        payload = run()
    tables = render(payload)
    print(markdown_tables(tables, left)) if args.markdown else print_tables(tables, left)
    if not args.report:
        write_json_atomic(args.out, payload)
        print(f"wrote {args.out}", file=sys.stderr)
    return payload
