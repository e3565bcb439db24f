"""Explanations that are safe to put in an e-mail.

Persona text comes from an LLM that read user reviews: it can carry markup, links, e-mail
addresses or phone numbers copied from a review. None of that may reach a customer's inbox, so
the explanation is rebuilt as plain text with those removed, and bounded in length.
"""

from __future__ import annotations

import html
import re

_TAG = re.compile(r"<[^>]*(?:>|$)", re.DOTALL)
_URL = re.compile(r"(?i)\b(?:(?:https?|ftp)://|www\.)\S+|\b[a-z0-9-]+(?:\.[a-z0-9-]+)*\.(?:com|net|org|io|co|info|biz|de|uk|ru|cn|ly|me)\b(?:/\S*)?")
_EMAIL = re.compile(r"(?i)\b[a-z0-9._%+-]+(?:@|\s*\[at\]\s*)[a-z0-9.-]+\.[a-z]{2,}\b")
_PHONE = re.compile(r"(?:\+?\d[\d\s().-]{6,}\d)")
_MARKDOWN = re.compile(r"[*_`#>\[\]{}|~]+")
_SPACE = re.compile(r"\s+")


def sanitize(text: str | None, max_chars: int) -> str:
    """Plain text: no HTML, no links, no e-mail addresses, no phone numbers; at most max_chars,
    cut at a word boundary with an ellipsis."""
    if not text:
        return ""
    t = html.unescape(_TAG.sub(" ", text))
    t = _TAG.sub(" ", t)
    t = _EMAIL.sub(" ", t)
    t = _URL.sub(" ", t)
    t = _PHONE.sub(" ", t)
    t = _MARKDOWN.sub(" ", t)
    t = _SPACE.sub(" ", t)
    t = re.sub(r"\s+([,.;:!?])", r"\1", t)
    t = re.sub(r"([,;:])(?:[,;:\s])+", r"\1 ", t).strip(" .;,-")
    if len(t) <= max_chars:
        return t
    cut = t[: max_chars - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip(" .,;") + "…"


def explanation(name: str, description: str, rationale: str, max_chars: int) -> str:
    body = sanitize(f"{description} {rationale}", max_chars)
    who = sanitize(name, 60)
    text = f"For {who}: {body}" if who else body
    return sanitize(text, max_chars)
