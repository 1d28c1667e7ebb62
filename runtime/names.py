"""The one name rule for served models (bases and adapters) and Ray applications.

A name is 1-128 characters of letters, digits, '.', '_' and '-', starting with a letter or a
digit, and never containing "..": ``fullmatch`` (``re.match`` with ``$`` would accept a name
ending in a newline, a second model that looks like the first).
"""

from __future__ import annotations

import re

from .errors import clip

MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
RULE = "use letters, digits, '.', '_' and '-' (at most 128, starting with a letter or digit, no '..')"


def is_model_name(name: object) -> bool:
    """Whether ``name`` may name a served model: the whole string follows the rule."""
    return isinstance(name, str) and MODEL_NAME.fullmatch(name) is not None and ".." not in name


def unknown_model(name: str) -> str:
    """The one NOT_FOUND message for a name that is neither a base nor an adapter the caller may
    use (the same text whether the adapter does not exist or belongs to another tenant)."""
    return f"unknown model {clip(name)}: not a base model and no adapter of that name is loaded"
