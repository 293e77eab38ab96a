"""Apache httpd configurations, for ``twistproxy import-apache``.

This package owns turning an httpd.conf into twistproxy's config: ``parser`` reads
Apache 2.4's syntax into an ordered tree (Includes spliced in, conditionals and
Defines resolved), and the mapper from directives to our config builds on it.
"""

from twistproxy.apache.parser import (
    BUILTIN_MODULES,
    ApacheConfigError,
    Node,
    Parsed,
    parse,
    parse_text,
)

__all__ = ["ApacheConfigError", "BUILTIN_MODULES", "Node", "Parsed", "parse", "parse_text"]
