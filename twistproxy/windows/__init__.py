"""What differs when twistproxy runs on Windows, in one place.

Owns the one platform test (`WINDOWS`) that the rest of the code consults, so a test
on Linux can select a Windows code path by passing `windows=True` where a function
takes it, instead of patching `sys.platform`. The pieces live beside it:
`binding.py` (socket options and bind-error wording), `service.py` (the Windows
service, pywin32) and `servicecli.py` (`twistproxy service ...`).
"""

from __future__ import annotations

import sys

WINDOWS = sys.platform == "win32"

__all__ = ["WINDOWS"]
