"""Explanations that are safe to put in an e-mail.

Persona text comes from an LLM that read user reviews: a review can instruct it, and it can carry
markup, links, e-mail addresses or phone numbers. None of that may reach a customer's inbox, so
names and explanations are rebuilt as plain text and bounded in length.

Order matters, because every step can create what an earlier one removed: entities are decoded
and tags stripped until nothing changes (`evil&lt;b&gt;.com` is a domain only once the tag is
gone), Unicode is folded (NFKC, zero-width and other invisible characters dropped, look-alike
dots made dots), spacing around punctuation is normalised (`http ://` becomes `http://`), and only
then is anything shaped like a URL, a domain of any ending, an e-mail address or a phone number
removed. The whole pass repeats until its output is stable (a fixed point), so no removal can
join the pieces of another link.
"""

from __future__ import annotations

import html
import re
import unicodedata
from typing import Iterator

import pandas as pd
from pyspark.sql import DataFrame

_TAG = re.compile(r"<[^>]*(?:>|$)", re.DOTALL)
# Characters with no visible width (zero-width space/joiners, word joiner, BOM, soft hyphen, bidi
# controls): they hide a link from a pattern without hiding it from a reader.
_INVISIBLE = re.compile("[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e\u200b-\u200f\u202a-\u202e"
                        "\u2060-\u2064\u206a-\u206f\u3164\ufe00-\ufe0f\ufeff\uffa0]")
# Dots that NFKC leaves alone but a reader (or a mail client) takes for one, between two
# non-spaces (`evil·com`; a spaced separator such as "Jazz · Blues" stays).
_DOTS = re.compile("(?<=\\S)[\u3002\uff61\ufe52\u2024\u2e33\u2e3c\u0701\u0702\u2027\u30fb\u00b7\u2219\u22c5](?=\\S)")
_SCHEME = r"(?:[a-z][a-z0-9+.-]{1,15}|h[tx]{2}ps?)\s*:\s*/\s*/"  # http://, hxxp://, ftp ://, any scheme
_LABEL = r"(?:xn--)?[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_URL = re.compile(
    rf"(?i){_SCHEME}\S*"  # anything with a scheme
    r"|\bwww\d{0,3}\s*\.\s*\S+"  # www.anything
    rf"|\b(?:{_LABEL}\.)+(?:[a-z]{{2,63}}|xn--[a-z0-9-]{{2,59}})\b(?:[:/?#]\S*)?"  # a domain, any ending
    r"|\b(?:\d{1,3}\.){3}\d{1,3}(?::\d+)?(?:/\S*)?")  # an IPv4 address
_EMAIL = re.compile(r"(?i)[a-z0-9._%+-]+\s*(?:@|\(at\)|\[at\]|\{at\})\s*[a-z0-9-]+(?:\s*(?:\.|\(dot\)|\[dot\])\s*"
                    r"[a-z0-9-]+)+")
_PHONE = re.compile(r"(?:\+?\d[\d\s().-]{6,}\d)")
# Features every match of a pattern contains (`_URL`: a scheme's `:/`, `www`, a dot followed by a
# letter, a dot between digits; `_EMAIL`: its at-sign or spelled-out at): where the text has
# none, the pattern cannot match and the substitution is skipped — same output, a fraction of
# the time on ordinary prose (these two patterns are most of the sanitiser's cost).
_URL_HINT = re.compile(r"(?i):\s*/|www|\.[a-z]|\d\.\d")
_EMAIL_HINT = re.compile(r"(?i)@|[(\[{]at[)\]}]")
# ASCII has no invisible or look-alike-dot characters and NFKC leaves it unchanged; its C and Z
# category characters are the controls (0x00-0x1f, 0x7f) and the space.
_ASCII_CONTROLS = {c: " " for c in [*range(0x20), 0x7f] if chr(c) not in "\n\t"}
_MARKDOWN = re.compile(r"[*_`#>\[\]{}|~]+")
_SPACE = re.compile(r"\s+")
_MAX_PASSES = 8


def _decode(text: str) -> str:
    """Entities decoded and tags removed until neither changes anything."""
    for _ in range(_MAX_PASSES):
        out = _TAG.sub(" ", html.unescape(text))
        if out == text:
            break
        text = out
    return text


def _fold(text: str) -> str:
    if text.isascii():
        return text.translate(_ASCII_CONTROLS)
    text = unicodedata.normalize("NFKC", text)
    text = _INVISIBLE.sub("", text)
    text = _DOTS.sub(".", text)
    return "".join(" " if unicodedata.category(c)[0] in "CZ" and c not in "\n\t" else c for c in text)


def _clean_once(text: str) -> str:
    t = _fold(_decode(text))
    t = _SPACE.sub(" ", t)
    t = re.sub(r"\s+([,.;:!?])", r"\1", t)
    t = re.sub(r"([,;:])(?:[,;:\s])+", r"\1 ", t)
    # Last, on the normalised text: anything that could be followed, mailed or dialled.
    t = _EMAIL.sub(" ", t) if _EMAIL_HINT.search(t) else t
    t = _URL.sub(" ", t) if _URL_HINT.search(t) else t
    t = _PHONE.sub(" ", t)
    t = _MARKDOWN.sub(" ", t)
    t = _SPACE.sub(" ", t)
    return re.sub(r"\s+([,.;:!?])", r"\1", t).strip(" .;,:-")


def plain_text(text: str | None) -> str:
    """Plain text with no markup, link, domain, e-mail address or phone number, cleaned until
    another pass would change nothing."""
    t = text or ""
    for _ in range(_MAX_PASSES):
        out = _clean_once(t)
        if out == t:
            return out
        t = out
    return t


def sanitize(text: str | None, max_chars: int) -> str:
    """plain_text, at most max_chars, cut at a word boundary with an ellipsis."""
    t = plain_text(text)
    if len(t) <= max_chars:
        return t
    cut = t[: max_chars - 1]
    space = cut.rfind(" ")
    return (cut[:space] if space > max_chars // 2 else cut).rstrip(" .,;") + "…"


def persona_texts(name: str, description: str, rationale: str, max_chars: int) -> tuple[str, str]:
    """(display name, e-mail explanation) of one persona; the name is cleaned once for both."""
    who = sanitize(name, 60)
    body = sanitize(f"{description} {rationale}", max_chars)
    return who, sanitize(f"For {who}: {body}" if who else body, max_chars)


def explanation(name: str, description: str, rationale: str, max_chars: int) -> str:
    return persona_texts(name, description, rationale, max_chars)[1]


def explanations(index: DataFrame, max_chars: int) -> DataFrame:
    """persona_id, persona_name, explanation: the e-mail texts of every persona, computed where the
    personas are (the blocked path never gathers them)."""

    def texts(frames: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        for f in frames:
            pairs = [persona_texts(a, b, c, max_chars)
                     for a, b, c in zip(f["name"], f["description"], f["preference_rationale"])]
            yield pd.DataFrame({"persona_id": f["persona_id"], "persona_name": [p[0] for p in pairs],
                                "explanation": [p[1] for p in pairs]})

    return index.select("persona_id", "name", "description", "preference_rationale").mapInPandas(
        texts, "persona_id string, persona_name string, explanation string")
