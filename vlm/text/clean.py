"""User text made safe to tokenize: the one cleaning that the API, `vlm eval` and `vlm serve` share."""

from __future__ import annotations

import unicodedata

from vlm.errors import VLMError


def clean_text(text: str, what: str = "text") -> str:
    """User text with control and other non-printing characters as spaces, runs of spaces as one; empty is an error."""
    if not isinstance(text, str):
        raise VLMError(f"{what}: expected text, got {type(text).__name__}")
    cleaned = " ".join("".join(" " if unicodedata.category(c).startswith("C") else c for c in text).split())
    if not cleaned:
        raise VLMError(f"{what} is empty" + (" (only whitespace or control characters)" if text else ""))
    return cleaned
