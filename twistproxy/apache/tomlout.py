"""Writing the imported configuration as commented TOML, in our own key order.

Owns turning a document of plain values (dicts, lists, str, int, float, bool) into TOML
text that people read and keep: tables in the order they were built, each headed by a
comment naming where in the Apache configuration it came from, and a comment after a
key where one was attached. The document marks comments with `Commented` tables; the
standard library reads TOML but does not write it, and what is written here is small.
"""

from __future__ import annotations

import re
from typing import Any

_BARE = re.compile(r"^[A-Za-z0-9_-]+$")


class Table(dict):
    """A TOML table with a comment above its header and comments after some keys."""

    def __init__(self, comment: str = "", **values: Any):
        super().__init__(**values)
        self.comment = comment
        self.notes: dict[str, str] = {}

    def note(self, key: str, text: str) -> "Table":
        self.notes[key] = text
        return self


def key(name: str) -> str:
    return name if _BARE.match(name) else string(name)


def string(value: str) -> str:
    """A TOML string: 'literal' when that needs no escapes (regexes, Windows paths
    stay as written), else a "basic" one."""
    if "'" not in value and "\n" not in value and not any(ord(c) < 32 for c in value):
        return f"'{value}'"
    out = value.replace("\\", "\\\\").replace('"', '\\"')
    out = "".join(c if ord(c) >= 32 else f"\\u{ord(c):04x}" for c in out)
    return f'"{out}"'


def value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v) if not isinstance(v, float) or not v.is_integer() else str(int(v))
    if isinstance(v, str):
        return string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {type(v).__name__}")


def _comment_lines(text: str, indent: str) -> list[str]:
    return [f"{indent}# {line}".rstrip() for line in text.splitlines()]


def dumps(doc: dict, header: str = "") -> str:
    lines: list[str] = _comment_lines(header, "") + ([""] if header else [])
    _table(lines, doc, [], top=True)
    return "\n".join(lines).rstrip() + "\n"


def _is_table_array(v: Any) -> bool:
    return isinstance(v, list) and bool(v) and all(isinstance(x, Table) for x in v)


def _table(lines: list[str], table: dict, path: list[str], top: bool = False) -> None:
    indent = "  " * max(0, len(path) - 1)
    notes = getattr(table, "notes", {})
    for k, v in table.items():
        if isinstance(v, Table) or _is_table_array(v):
            continue
        text = f"{indent}{key(k)} = {value(v)}"
        if k in notes:
            text += f"    # {notes[k]}"
        lines.append(text)
    for k, v in table.items():
        if isinstance(v, Table):
            sub = path + [k]
            if v.comment or any(not (isinstance(x, Table) or _is_table_array(x))
                                for x in v.values()):
                lines.append("")
                lines.extend(_comment_lines(v.comment, "  " * (len(sub) - 1)))
                lines.append(f"{'  ' * (len(sub) - 1)}[{'.'.join(key(p) for p in sub)}]")
            _table(lines, v, sub)
        elif _is_table_array(v):
            sub = path + [k]
            for item in v:
                lines.append("")
                lines.extend(_comment_lines(item.comment, "  " * (len(sub) - 1)))
                lines.append(f"{'  ' * (len(sub) - 1)}[[{'.'.join(key(p) for p in sub)}]]")
                _table(lines, item, sub)
