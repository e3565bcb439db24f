"""Text cleaning for scraped metadata.

Amazon metadata is scraped HTML: the 2018 Magazine_Subscriptions titles are mostly truncated
`<span class=...` fragments, categories carry `&amp;`. We strip markup and entities and treat what
is left empty as missing, so downstream prompts never see HTML and fall back to other fields.
"""

from __future__ import annotations

import html
import json
import re

_TAG = re.compile(r"<[^>]*(?:>|$)", re.DOTALL)  # also a tag cut off at the end of the string
_SPACE = re.compile(r"\s+")


def clean_text(value: object) -> str | None:
    """Markup and entities removed, whitespace collapsed; None when nothing readable is left."""
    if value is None:
        return None
    text = html.unescape(_TAG.sub(" ", str(value)))
    text = _TAG.sub(" ", text)  # entities may have encoded markup (&lt;b&gt;)
    text = _SPACE.sub(" ", text).strip()
    return text or None


def clean_list(values: object) -> list[str] | None:
    """A list of cleaned, non-empty, de-duplicated strings (order kept); a scalar becomes [scalar]."""
    if values is None:
        return None
    if not isinstance(values, (list, tuple)):
        values = [values]
    out: list[str] = []
    for v in _flatten(values):
        c = clean_text(v)
        if c and c not in out:
            out.append(c)
    return out or None


def _flatten(values):
    for v in values:
        if isinstance(v, (list, tuple)):  # 2014 metadata nests category paths
            yield from _flatten(v)
        else:
            yield v


def clean_details(value: object) -> dict[str, str] | None:
    """Key/value details with keys like 'Publisher:' tidied; nested values flattened to text."""
    if not isinstance(value, dict):
        return None
    out: dict[str, str] = {}
    for k in sorted(value, key=str):
        key = clean_text(k)
        v = value[k]
        if isinstance(v, (dict, list)):
            v = json.dumps(v, sort_keys=True, ensure_ascii=False)
        val = clean_text(v)
        if key and val:
            out[key.rstrip(": ").strip()] = val
    return out or None
