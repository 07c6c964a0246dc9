"""The values table of helm/tokenwire/README.md, generated from the `# --` comments in values.yaml.

    python helm/values_doc.py --write   # rewrite the table between the README's markers
    python helm/values_doc.py --check   # exit 1 if the README is stale or a value is undocumented

A `# -- text` comment (continued by further `#` lines) documents the key below it; a documented map is one
row holding its whole default. Every value must be documented by itself or by a documented ancestor.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml

CHART = Path(__file__).resolve().parent / "tokenwire"
START, END = "<!-- values-table:start -->", "<!-- values-table:end -->"
KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_]+):(?:\s|$)")
DOC = re.compile(r"^ *# -- ?(?P<text>.*)$")
PIPE = "\\|"  # a literal pipe inside a Markdown table cell
MORE = re.compile(r"^ *#(?: (?P<text>.*))?$")


def documented_keys(values_text: str) -> list[tuple[str, str]]:
    """(dotted key, description) for every key preceded by a `# --` comment, in file order."""
    rows: list[tuple[str, str]] = []
    stack: list[tuple[int, str]] = []
    doc: list[str] | None = None
    for line in values_text.splitlines():
        if m := DOC.match(line):
            doc = [m["text"]]
            continue
        if doc is not None and (m := MORE.match(line)):
            doc.append(m["text"] or "")
            continue
        if m := KEY.match(line):
            indent = len(m["indent"])
            while stack and stack[-1][0] >= indent:
                stack.pop()
            stack.append((indent, m["key"]))
            if doc is not None:
                rows.append((".".join(k for _, k in stack), " ".join(d.strip() for d in doc).strip()))
        doc = None
    return rows


def lookup(values: dict[str, Any], dotted: str) -> Any:
    node: Any = values
    for part in dotted.split("."):
        node = node[part]
    return node


def leaves(node: Any, prefix: str = "") -> list[str]:
    """Dotted paths of every value that is not a non-empty map (lists count as one value)."""
    if isinstance(node, dict) and node:
        return [p for k, v in node.items() for p in leaves(v, f"{prefix}.{k}" if prefix else k)]
    return [prefix]


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}[type(value)]


def table(values_text: str) -> str:
    values = yaml.safe_load(values_text)
    rows = ["| Key | Type | Default | Description |", "|---|---|---|---|"]
    for key, description in documented_keys(values_text):
        value = lookup(values, key)
        default = json.dumps(value, separators=(", ", ": ")).replace("|", PIPE)
        rows.append(f"| `{key}` | {type_name(value)} | `{default}` | {description.replace('|', PIPE)} |")
    return "\n".join(rows)


def problems(values_text: str) -> list[str]:
    """Values that no `# --` comment documents, by themselves or through an ancestor."""
    documented = {k for k, _ in documented_keys(values_text)}
    values = yaml.safe_load(values_text)
    out = []
    for leaf in leaves(values):
        parts = leaf.split(".")
        if not any(".".join(parts[:i]) in documented for i in range(1, len(parts) + 1)):
            out.append(f"values.yaml: `{leaf}` has no `# --` description")
    return out


def render_readme(readme: str, values_text: str) -> str:
    head, rest = readme.split(START, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}\n{table(values_text)}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", action="store_true", help="rewrite the README's table")
    mode.add_argument("--check", action="store_true", help="fail if the README's table is stale")
    args = parser.parse_args()
    values_text = (CHART / "values.yaml").read_text()
    readme_path = CHART / "README.md"
    readme = readme_path.read_text()
    errors = problems(values_text)
    expected = render_readme(readme, values_text)
    if args.write:
        readme_path.write_text(expected)
    elif expected != readme:
        errors.append(f"{readme_path} is stale: run scripts/helm_docs.sh")
    for error in errors:
        print(error, file=sys.stderr)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
