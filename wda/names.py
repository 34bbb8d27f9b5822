"""Module names: the one matching rule shared by the analysis (``--modules``) and the
adapters (``AdapterSpec.targets``)."""

from __future__ import annotations

import re


def matches(name: str, pattern: str) -> bool:
    """A pattern names a module by dotted suffix (``q_proj`` matches ``...attn.q_proj``) or is
    a regular expression matching the whole name (``layers\\.[0-3]\\..*q_proj``)."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False
