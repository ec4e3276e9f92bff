"""Regenerate the reference parts of the manual from the code, or check that they are current.

    python docs/generate.py           # rewrite every generated block
    python docs/generate.py --check   # exit 1, naming each stale page, when a block differs

A generated block sits between two markers in a page of docs/:

    <!-- BEGIN GENERATED: NAME -->
    ...
    <!-- END GENERATED: NAME -->

and NAME picks what fills it (see GENERATORS): a command's ``--help``, the run format's
tables (from ``gradscope.rundir``), or the ``--json`` output of a command on a sample run
that ships with the repository. Text outside the markers is written by hand and left alone.
CI runs ``--check`` (tests/test_docs.py), so a change of an option, a column or a JSON key
that is not carried into the manual fails the build.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BLOCK = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>[^>]+?) -->\n)(?P<body>.*?)(<!-- END GENERATED: (?P=name) -->)",
                   re.S)


def _gradscope(*args: str) -> str:
    env = {**os.environ, "COLUMNS": "100", "NO_COLOR": "1", "TERM": "dumb", "PYTHONPATH": str(ROOT)}
    env.pop("FORCE_COLOR", None)
    p = subprocess.run([sys.executable, "-m", "gradscope", *args], capture_output=True, text=True, cwd=ROOT,
                       env=env, timeout=300)
    if p.returncode not in (0, 1):
        raise SystemExit(f"docs/generate.py: `gradscope {' '.join(args)}` exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def cli_help(command: str) -> str:
    args = [command, "--help"] if command != "gradscope" else ["--help"]
    text = _gradscope(*args).rstrip()
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return f"```text\n$ gradscope {' '.join(args)}\n{text}\n```\n"


def _column_docs(source: str, list_name: str) -> list[tuple[str, str]]:
    """(name, comment) for each string of a list literal in rundir.py, its comment the description."""
    tree = ast.parse(source)
    lines = source.splitlines()
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == list_name for t in node.targets):
            out = []
            for elt in node.value.elts:  # type: ignore[attr-defined]
                if isinstance(elt, ast.Constant) and isinstance(elt.value, str):
                    line = lines[elt.lineno - 1]
                    comment = line.split("#", 1)[1].strip() if "#" in line else ""
                    out.append((elt.value, comment))
            return out
    raise SystemExit(f"docs/generate.py: gradscope/rundir.py has no list {list_name}")


def step_columns() -> str:
    source = (ROOT / "gradscope" / "rundir.py").read_text(encoding="utf-8")
    rows = ["| column | meaning |", "|---|---|"]
    rows += [f"| `{name}` | {doc.replace('|', '/')} |" for name, doc in _column_docs(source, "STEP_COLUMNS")]
    return "\n".join(rows) + "\n"


def run_layout() -> str:
    source = (ROOT / "gradscope" / "rundir.py").read_text(encoding="utf-8")
    doc = ast.get_docstring(ast.parse(source)) or ""
    return f"```text\n{doc.strip()}\n```\n"


def json_output(spec: str) -> str:
    args = spec.split()
    out = _gradscope(*args)
    json.loads(out)  # must be JSON
    return f"```json\n$ gradscope {' '.join(args)}\n{out.rstrip()}\n```\n"


def generate(name: str) -> str:
    kind, _, arg = name.partition(":")
    if kind == "cli":
        return cli_help(arg)
    if kind == "format" and arg == "step-columns":
        return step_columns()
    if kind == "format" and arg == "layout":
        return run_layout()
    if kind == "json":
        return json_output(arg)
    raise SystemExit(f"docs/generate.py: unknown generated block {name!r}")


def process(page: Path, cache: dict[str, str]) -> tuple[str, str]:
    text = page.read_text(encoding="utf-8")

    def fill(m: re.Match) -> str:
        name = m.group("name")
        if name not in cache:
            cache[name] = generate(name)
        return m.group(1) + cache[name] + m.group(4)

    return text, BLOCK.sub(fill, text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="fail (exit 1) when a generated block is stale")
    a = ap.parse_args(argv)
    cache: dict[str, str] = {}
    stale = []
    for page in sorted(DOCS.rglob("*.md")):
        old, new = process(page, cache)
        if old != new:
            stale.append(page.relative_to(ROOT))
            if not a.check:
                page.write_text(new, encoding="utf-8")
    if a.check and stale:
        for p in stale:
            print(f"{p}: generated reference is stale; run `python docs/generate.py`", file=sys.stderr)
        return 1
    if not a.check:
        print(f"{len(stale)} page(s) rewritten" if stale else "every generated block is current")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
