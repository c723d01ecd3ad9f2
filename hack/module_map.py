#!/usr/bin/env python3
"""Print the package's module map: one line per module of operator/warren_mesh (path, lines, what it is, from the
first sentence of its docstring). docs/architecture.md holds its output; `--check` fails when that is stale."""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "operator" / "warren_mesh"
DOC = ROOT / "docs" / "architecture.md"
BEGIN, END = "<!-- module map -->", "<!-- end of module map -->"


def module_map() -> str:
    lines = []
    for path in sorted(PACKAGE.rglob("*.py")):
        docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
        sentence = re.split(r"(?<=\.)\s", " ".join(docstring.split("\n\n")[0].split()), maxsplit=1)[0]
        lines.append(f"- `{path.relative_to(PACKAGE)}`: {sentence.rstrip('.') or '(no docstring)'}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--check", action="store_true", help="fail if docs/architecture.md's map is stale")
    parser.add_argument("--write", action="store_true", help="rewrite the map in docs/architecture.md")
    args = parser.parse_args()
    current = module_map()
    if not (args.check or args.write):
        print(current)
        return 0
    text = DOC.read_text()
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    if args.check:
        if text[start:end].strip() != current:
            print("docs/architecture.md: the module map is stale; run hack/module_map.py --write", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(f"{text[:start]}\n{current}\n{text[end:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
