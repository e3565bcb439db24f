"""A name to show for every item, in the demo, the notebooks and an e-mail.

Scraped catalogues lose titles: in the shipped Magazine sample every title is a cut-off `<span`
fragment, which ingest rightly turns into null. A customer must still see what is recommended, so
when an item has no title its name is derived from its metadata — the proper name its description
uses most (a run of capitalised words such as "Better Homes & Gardens", "Harper's BAZAAR"), else
its brand and category — and marked as derived, so nobody mistakes it for the catalogue's title.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Sequence

DERIVED_MARK = "*"  # shown after a derived name; legends say "* name derived from the metadata"
MAX_WORDS = 6
_CAP = r"(?:[A-Z][A-Za-z'’.-]*[A-Za-z]|[A-Z])"
_RUN = re.compile(rf"{_CAP}(?:\s+(?:(?:&|of|and|the|for|de|du|la)\s+)*{_CAP})*")
# Capitalised only because they start a sentence: a name does not begin with them.
_STARTERS = frozenset("""a an and as at be but by discover each enjoy every explore find for from get give how
in is it its keep learn make now our save see she subscribe tackle that these this those what when where whether
which who why with you your satisfy""".split())


def _trim(run: str) -> str:
    words = run.split()[:MAX_WORDS]
    while words and words[0].lower().strip("'’") in _STARTERS:
        words = words[1:]
    return " ".join(words).rstrip(".")


def _subruns(run: str) -> list[str]:
    """Every contiguous part of a run that starts and ends with a capitalised word."""
    words = run.split()
    cap = [bool(re.fullmatch(_CAP, w)) for w in words]
    return [" ".join(words[i:j + 1]) for i in range(len(words)) for j in range(i, len(words)) if cap[i] and cap[j]]


def derived_name(description: str | None, brand: str | None = None,
                 categories: Sequence[str] | None = None) -> str | None:
    """The item's likely proper name from its description (the run it opens with, else the part of
    a run it repeats most), else "<brand> <last category>"."""
    text = " ".join((description or "").split())
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    opening = None
    for m in _RUN.finditer(text):
        run = _trim(m.group(0))
        if len(run) < 2 or run == "The" or (brand and run.lower() == brand.lower()):
            continue  # a lone letter ("O, The Oprah Magazine"), an article, or the publisher
        if m.start() == 0 and run == " ".join(m.group(0).split()[:MAX_WORDS]).rstrip("."):
            opening = opening or run
        for part in _subruns(run):
            if part != "The" and len(part) > 1:
                counts[part] += 1
                first.setdefault(part, m.start())
    if opening:
        return opening
    if counts:
        # The most repeated part, then a name of several words, the longer, the earlier.
        return max(counts, key=lambda r: (counts[r], len(r.split()) > 1, len(r.split()), -first[r]))
    cats = [c for c in (categories or []) if c]
    if brand or cats:
        return " ".join(x for x in (brand, cats[-1] if cats else None) if x)
    return None


def display_name(item: dict) -> tuple[str, bool]:
    """(name, derived) for an item row with item_id, title, description, brand, categories."""
    if item.get("title"):
        return str(item["title"]), False
    description = item.get("description")
    if isinstance(description, (list, tuple)):
        description = " ".join(str(d) for d in description)
    name = derived_name(description, item.get("brand"), item.get("categories"))
    return (name, True) if name else (f"Item {item['item_id']}", True)


def shown(item: dict) -> str:
    """The name as printed: a derived one carries DERIVED_MARK."""
    name, derived = display_name(item)
    return f"{name}{DERIVED_MARK}" if derived else name
