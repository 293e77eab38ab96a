"""Apache httpd configuration syntax: the tokenizer and the section tree.

This module owns reading an httpd.conf the way Apache 2.4 reads it, and nothing
about what the directives mean (that is the mapper's job): logical lines
(``\\``-continuations joined, ``#`` comment lines dropped), the words of a line
(``ap_getword_conf``'s quoting and escapes), ``${VAR}`` expansion, ``<Section>``
nesting, ``Include``/``IncludeOptional`` relative to the ServerRoot, and the
conditionals (``<IfModule>``, ``<IfDefine>``, ``<IfVersion>``) plus ``Define``/
``UnDefine``, which are resolved here and never reach the tree.

The rules follow Apache's own code (server/util.c ``ap_cfg_getline_core``,
``ap_getword_conf``, ``substring_conf``, ``ap_dir_fnmatch``; server/config.c
``ap_build_config_sub``; server/core.c ``ap_resolve_env``, ``include_config``,
``set_define``; modules/metadata/mod_version.c):

- A physical line whose last character (before ``\\n``/``\\r\\n``) is ``\\`` is
  joined with the next one: the backslash goes, the next line's leading blanks
  stay.  ``\\`` followed by blanks is not a continuation.  The joined line is
  trimmed; it is a comment only if it then starts with ``#``.
- ``${NAME}`` (and ``${NAME?=default}``) is expanded on the whole line before
  it is split into words, as Apache does, so a value with blanks makes several
  arguments.  An undefined variable is kept literally, with a warning (Apache
  logs "Config variable ${NAME} is not defined"); unlike Apache the process
  environment is not consulted, because the importing machine is not the
  server.
- Words are split on blanks; a word starting with ``"`` or ``'`` runs to the
  matching quote (or to the end of the line: an unterminated quote is not an
  error in Apache), and inside it ``\\<quote>`` and ``\\\\`` are escapes.  Outside
  quotes ``\\\\`` is still one backslash; every other backslash stays.
- ``ServerRoot`` takes effect for the Includes after it, whether or not a
  server root was passed in (Apache: the directive wins over ``-d`` once read).
- ``Include`` takes a glob relative to the ServerRoot; wildcards may be in any
  component (a component in the middle matches directories only), names
  starting with ``.`` need an explicit ``.``, matches are sorted bytewise
  (``strcmp``), a directory means every file under it, recursively and sorted.
  A missing plain Include or an unmatched wildcard is an error (Apache's
  wording); ``IncludeOptional`` skips them.  A file including itself, directly
  or not, is an "Include loop" at the Include line (Apache only notices at its
  include depth of 128, which is also kept).
- ``<IfModule>`` is true for ``BUILTIN_MODULES`` and for what an earlier
  ``LoadModule name .../mod_X.so`` loaded (``name`` and ``mod_X.c``).  A false
  conditional's body is skipped unread (no Include, Define or LoadModule in it
  happens), only its nesting is checked, as ``ap_soak_end_container`` does.

Where this differs from Apache, on purpose:

- ``Node.line`` is the first line of a continued directive (Apache reports the
  last one), and an unclosed section is reported at its opening line (Apache:
  ``<X> was not closed.`` there too, but "Expected </IfX> before end of
  configuration" at the end of the file for conditionals).
- A stray closer inside a true conditional, ``<IfModule m>`` ... ``</Location>``,
  is "Expected </IfModule> but saw </Location>" (Apache: "</Location> without
  matching <Location> section").
- Directive arguments are not checked (``ServerName a b`` passes here); only
  what this module resolves (Include, Define, UnDefine, ServerRoot, the
  conditionals) is.

Errors are ``ApacheConfigError(file, line, message)``; ``str()`` is
``file:line: message``.
"""

from __future__ import annotations

import fnmatch
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator

__all__ = [
    "ApacheConfigError",
    "BUILTIN_MODULES",
    "Node",
    "Parsed",
    "parse",
    "parse_text",
]

#: Debian apache2's compiled-in modules (``apache2 -l``), as source names and identifiers.
BUILTIN_MODULES = frozenset(
    {
        "core.c", "mod_so.c", "mod_watchdog.c", "http_core.c", "mod_log_config.c",
        "mod_logio.c", "mod_version.c", "mod_unixd.c",
        "core_module", "so_module", "watchdog_module", "http_module",
        "log_config_module", "logio_module", "version_module", "unixd_module",
    }
)

_RESOLVED = {"include", "includeoptional", "define", "undefine"}
_CONDITIONALS = {"ifmodule", "ifdefine", "ifversion"}
_MAX_INCLUDE_DEPTH = 128


@dataclass(frozen=True)
class Node:
    name: str
    args: tuple[str, ...]
    file: str
    line: int
    children: tuple["Node", ...] | None = None
    raw: str = ""

    @property
    def key(self) -> str:
        return self.name.lower()

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"

    @property
    def is_section(self) -> bool:
        return self.children is not None


@dataclass(frozen=True)
class Parsed:
    nodes: tuple[Node, ...]
    modules: frozenset[str]
    server_root: str
    files: tuple[str, ...]
    defines: dict
    warnings: tuple[str, ...] = field(default=())


class ApacheConfigError(Exception):
    """`file:line: message`; a whole file's problem (line 0) is `file: message`."""

    def __init__(self, file: str, line: int, message: str):
        super().__init__(f"{file}:{line}: {message}" if line else f"{file}: {message}")
        self.file = file
        self.line = line
        self.message = message

    def __str__(self) -> str:
        return str(self.args[0])


# -- tokenizer ---------------------------------------------------------------


def logical_lines(text: str) -> Iterator[tuple[int, str]]:
    """(first line number, trimmed text) of each non-blank, non-comment line."""
    if text.startswith("\ufeff"):
        text = text[1:]
    physical = text.split("\n")
    if physical and physical[-1] == "":
        physical.pop()
    buf: list[str] = []
    start = 0
    for number, line in enumerate(physical, 1):
        if line.endswith("\r"):
            line = line[:-1]
        if not buf:
            start = number
        if line.endswith("\\"):
            buf.append(line[:-1])
            continue
        buf.append(line)
        joined = "".join(buf).strip()
        buf = []
        if joined and not joined.startswith("#"):
            yield start, joined
    if buf:
        joined = "".join(buf).strip()
        if joined and not joined.startswith("#"):
            yield start, joined


def _unescape(s: str, quote: str) -> str:
    out = []
    i = 0
    while i < len(s):
        c = s[i]
        if c == "\\" and i + 1 < len(s) and (s[i + 1] == "\\" or (quote and s[i + 1] == quote)):
            out.append(s[i + 1])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def getword(line: str) -> tuple[str, str]:
    """One word off the front of ``line`` (``ap_getword_conf``): (word, rest)."""
    s = line.lstrip()
    if not s:
        return "", ""
    quote = s[0]
    if quote in "\"'":
        i = 1
        while i < len(s) and s[i] != quote:
            if s[i] == "\\" and i + 1 < len(s) and s[i + 1] in (quote, "\\"):
                i += 2
            else:
                i += 1
        word = _unescape(s[1:i], quote)
        if i < len(s):
            i += 1
    else:
        i = 0
        while i < len(s) and not s[i].isspace():
            i += 1
        word = _unescape(s[:i], "")
    return word, s[i:].lstrip()


def split_words(line: str) -> tuple[str, ...]:
    words = []
    rest = line.strip()
    while rest:
        word, rest = getword(rest)
        words.append(word)
    return tuple(words)


_VAR = re.compile(r"\$\{([^}]*)\}")


def _parse_version(text: str) -> tuple[int, int, int] | None:
    m = re.fullmatch(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", text)
    if not m:
        return None
    return tuple(int(g) if g is not None else 0 for g in m.groups())  # type: ignore[return-value]


# -- the tree ----------------------------------------------------------------


def _unclosed(file: str, opener: tuple[str, int]) -> ApacheConfigError:
    """A section open at end of file, pointed at its opening line, in Apache's words."""
    if opener[0].lower() in _CONDITIONALS:
        return ApacheConfigError(
            file, opener[1], f"Expected </{opener[0]}> before end of configuration"
        )
    return ApacheConfigError(file, opener[1], f"<{opener[0]}> was not closed.")


class _Parser:
    def __init__(self, server_root: str, defines: Iterable[str], version: tuple[int, int, int]):
        self.server_root = os.path.abspath(server_root)
        self.version = tuple(version)
        self.defines: dict[str, str] = {}
        self.values: dict[str, str] = {}
        for name in defines:
            self.defines.setdefault(name, "")
        self.modules: set[str] = set(BUILTIN_MODULES)
        self.files: list[str] = []
        self.warnings: list[str] = []
        self.stack: list[str] = []

    # variables
    def expand(self, text: str, file: str, line: int) -> str:
        def one(m: re.Match) -> str:
            name = m.group(1)
            default = None
            if "?=" in name:
                name, default = name.split("?=", 1)
            if name in self.values:
                return self.values[name]
            if default is not None:
                return default
            if ":" not in name:
                self.warnings.append(f"{file}:{line}: Config variable ${{{name}}} is not defined")
            return m.group(0)

        return _VAR.sub(one, text) if "${" in text else text

    # files
    def read_file(self, path: str, at: tuple[str, int] | None) -> list[Node]:
        try:
            with open(path, "rb") as f:
                text = f.read().decode("utf-8", "surrogateescape")
        except OSError as e:
            if at is None:
                raise ApacheConfigError(path, 0, f"cannot read: {e.strerror or e}") from None
            raise ApacheConfigError(
                at[0], at[1], f"Could not open configuration file {path}: {e.strerror or e}"
            ) from None
        return self.read_text(text, path)

    def read_text(self, text: str, file: str) -> list[Node]:
        self.files.append(file)
        self.stack.append(file)
        lines = logical_lines(text)
        try:
            return self.block(lines, file, None)
        finally:
            self.stack.pop()

    def block(self, lines: Iterator[tuple[int, str]], file: str,
              opener: tuple[str, int] | None) -> list[Node]:
        """Nodes up to the closer of ``opener`` (section name, line), or to EOF."""
        out: list[Node] = []
        for number, text in lines:
            expanded = self.expand(text, file, number)
            name, rest = getword(expanded)
            raw_rest = getword(text)[1]
            if name.startswith("</"):
                if opener is None:
                    raise ApacheConfigError(
                        file, number, f"{name} without matching <{name[2:]} section"
                    )
                if not name.endswith(">"):
                    raise ApacheConfigError(file, number, f"{name}> directive missing closing '>'")
                if name[2:-1].lower() != opener[0].lower():
                    raise ApacheConfigError(
                        file, number, f"Expected </{opener[0]}> but saw {name}"
                    )
                return out
            if name.startswith("<"):
                out.extend(self.section(lines, file, number, name, rest, raw_rest))
                continue
            key = name.lower()
            args = split_words(rest)
            if key in _RESOLVED:
                out.extend(self.resolved(key, name, args, file, number))
                continue
            if key == "loadmodule" and len(args) == 2:
                self.modules.add(args[0])
                base = os.path.basename(args[1])
                if base.startswith("mod_") and base.endswith(".so"):
                    self.modules.add(base[:-3] + ".c")
            elif key == "serverroot" and len(args) == 1:
                root = os.path.abspath(args[0])
                if not os.path.isdir(root):
                    raise ApacheConfigError(file, number, "ServerRoot must be a valid directory")
                self.server_root = root
            out.append(Node(name, args, file, number, None, raw_rest))
        if opener is not None:
            raise _unclosed(file, opener)
        return out

    def section(self, lines, file, number, name, rest, raw_rest) -> list[Node]:
        if name.endswith(">"):
            name = name[:-1]
            if not rest:
                rest = raw_rest = ">"
        sname = name[1:]
        end = rest.rfind(">")
        if end < 0:
            raise ApacheConfigError(file, number, f"{name}> directive missing closing '>'")
        args = split_words(rest[:end])
        raw_end = raw_rest.rfind(">")
        raw = raw_rest[:raw_end].strip() if raw_end >= 0 else raw_rest
        key = sname.lower()
        if key in _CONDITIONALS:
            if self.condition(key, name, args, file, number):
                return self.block(lines, file, (sname, number))
            self.soak(lines, file, (sname, number))
            return []
        children = self.block(lines, file, (sname, number))
        return [Node(sname, args, file, number, tuple(children), raw)]

    def soak(self, lines, file, opener) -> None:
        """Skip a false conditional's body; nesting and closers are still checked."""
        for number, text in lines:
            name, rest = getword(text)
            if name.startswith("</"):
                if not name.endswith(">"):
                    raise ApacheConfigError(file, number, f"{name}> directive missing closing '>'")
                if name[2:-1].lower() != opener[0].lower():
                    raise ApacheConfigError(file, number, f"Expected </{opener[0]}> but saw {name}")
                return
            if name.startswith("<"):
                if name.endswith(">"):
                    name = name[:-1]
                self.soak(lines, file, (name[1:], number))
        raise ApacheConfigError(
            file, opener[1], f"Expected </{opener[0]}> before end of configuration"
        )

    def condition(self, key, name, args, file, number) -> bool:
        if key == "ifversion":
            return self.if_version(name, args, file, number)
        if len(args) != 1 or args[0] in ("", "!"):
            raise ApacheConfigError(
                file, number, f"{name}> directive requires exactly one argument"
            )
        arg = args[0]
        negate = arg.startswith("!")
        if negate:
            arg = arg[1:]
        if key == "ifmodule":
            found = arg in self.modules
        else:
            found = arg in self.defines
        return found != negate

    def if_version(self, name, args, file, number) -> bool:
        if len(args) == 1:
            op, ver = "=", args[0]
        elif len(args) == 2:
            op, ver = args
        else:
            raise ApacheConfigError(file, number, f"{name}> takes one or two arguments")
        negate = op.startswith("!")
        if negate and len(op) > 1:
            op = op[1:]
        current = ".".join(str(n) for n in self.version)
        if op in ("=", "==") and ver.startswith("/"):
            if len(ver) < 2 or not ver.endswith("/"):
                raise ApacheConfigError(file, number, "Missing delimiting / of regular expression.")
            op, ver = "~", ver[1:-1]
        if op == "~":
            try:
                match = re.search(ver, current) is not None
            except re.error as e:
                raise ApacheConfigError(
                    file, number, f"Unable to compile regular expression '{ver}': {e}"
                ) from None
        elif op in ("=", "==", "<", "<=", ">", ">="):
            want = _parse_version(ver)
            if want is None:
                raise ApacheConfigError(
                    file, number,
                    "Version appears to be invalid. It must have the format "
                    "major[.minor[.patch]] where major, minor and patch are numbers.",
                )
            have = self.version
            match = {
                "=": have == want, "==": have == want, "<": have < want,
                "<=": have <= want, ">": have > want, ">=": have >= want,
            }[op]
        else:
            raise ApacheConfigError(file, number, f"unrecognized operator '{args[0]}'")
        return match != negate

    def resolved(self, key, name, args, file, number) -> list[Node]:
        if key in ("include", "includeoptional"):
            if len(args) != 1:
                raise ApacheConfigError(file, number, f"{name} takes one argument")
            return self.include(args[0], key == "includeoptional", file, number)
        if key == "define":
            if len(args) not in (1, 2):
                raise ApacheConfigError(file, number, f"{name} takes 1-2 arguments")
        elif len(args) != 1:
            raise ApacheConfigError(file, number, f"{name} takes one argument")
        var = args[0]
        if ":" in var:
            raise ApacheConfigError(file, number, "Variable name must not contain ':'")
        if key == "define":
            self.defines[var] = args[1] if len(args) == 2 else ""
            if len(args) == 2:
                self.values[var] = args[1]
        else:
            self.defines.pop(var, None)
            self.values.pop(var, None)
        return []

    # includes
    def include(self, pattern: str, optional: bool, file: str, number: int) -> list[Node]:
        if len(self.stack) > _MAX_INCLUDE_DEPTH:
            raise ApacheConfigError(
                file, number,
                f"Exceeded maximum include depth of {_MAX_INCLUDE_DEPTH}, "
                "There appears to be a recursion.",
            )
        path = os.path.join(self.server_root, pattern)
        paths: list[str] = []
        self.match(path, optional, paths, file, number)
        out: list[Node] = []
        for p in paths:
            if p in self.stack:
                chain = " -> ".join(self.stack[self.stack.index(p):] + [p])
                raise ApacheConfigError(file, number, f"Include loop: {chain}")
            out.extend(self.read_file(p, (file, number)))
        return out

    def match(self, path: str, optional: bool, out: list[str], file: str, number: int) -> None:
        """``ap_dir_fnmatch``: wildcards in any component, matches in strcmp order."""
        prefix = "Include/IncludeOptional: "
        parts = path.split("/")
        for i, part in enumerate(parts):
            if any(c in part for c in "*?["):
                base = "/".join(parts[:i]) or "/"
                rest = "/".join(parts[i + 1:])
                try:
                    names = os.listdir(base)
                except OSError as e:
                    if optional and isinstance(e, FileNotFoundError):
                        return
                    raise ApacheConfigError(
                        file, number,
                        f"{prefix}Could not open directory {base}: {e.strerror}",
                    ) from None
                hits = sorted(
                    os.path.join(base, n) for n in names
                    if fnmatch.fnmatchcase(n, part)
                    and (not n.startswith(".") or part.startswith("."))
                    and (not rest or os.path.isdir(os.path.join(base, n)))
                )
                if not hits:
                    if not optional:
                        raise ApacheConfigError(
                            file, number,
                            f"{prefix}No matches for the wildcard '{part}' in '{base}', failing",
                        )
                    return
                for hit in hits:
                    if rest:
                        self.match(hit + "/" + rest, optional, out, file, number)
                    else:
                        self.no_match(hit, optional, out, file, number)
                return
        self.no_match(path, optional, out, file, number)

    def no_match(self, path: str, optional: bool, out: list[str], file: str, number: int) -> None:
        """``ap_dir_nofnmatch``: a directory means all of it, recursively."""
        if os.path.isdir(path):
            for name in sorted(os.listdir(path)):
                self.no_match(os.path.join(path, name), optional, out, file, number)
            return
        if optional and not os.path.exists(path):
            return
        out.append(path)

    def result(self, nodes: list[Node]) -> Parsed:
        return Parsed(
            nodes=tuple(nodes),
            modules=frozenset(self.modules),
            server_root=self.server_root,
            files=tuple(self.files),
            defines=dict(self.defines),
            warnings=tuple(self.warnings),
        )


def parse(path: str, server_root: str | None = None, defines: Iterable[str] = (),
          version: tuple[int, int, int] = (2, 4, 62)) -> Parsed:
    """Read ``path`` and everything it includes; ``server_root`` defaults to its folder."""
    path = os.path.abspath(path)
    parser = _Parser(server_root if server_root is not None else os.path.dirname(path),
                     defines, version)
    return parser.result(parser.read_file(path, None))


def parse_text(text: str, file: str = "<text>", server_root: str | None = None,
               defines: Iterable[str] = (),
               version: tuple[int, int, int] = (2, 4, 62)) -> Parsed:
    """Like ``parse`` on ``text`` as if read from ``file``; ``server_root`` defaults to the cwd."""
    parser = _Parser(server_root if server_root is not None else os.getcwd(), defines, version)
    return parser.result(parser.read_text(text, file))
