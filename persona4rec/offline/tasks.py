"""The three offline LLM tasks: prompts, rendering of their inputs, and checks of their replies.

Plain Python (no Spark): each `*_messages` function turns one input record into chat messages,
so prompts are testable alone and the Spark stages only map these over partitions.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Sequence

from persona4rec.llm.outputs import SLOTS, ItemPersonas, ItemSummary, ReviewAspects, item_personas_model
from persona4rec.llm.prompts import approx_tokens, load_prompt, untrusted
from persona4rec.llm.runner import LLMTask

DESCRIPTION_TOKENS = 300
TUPLE_FIELD_TOKENS = 30


def summary_task(domain: str) -> LLMTask:
    return LLMTask("summarise_items", load_prompt(domain, "summary"), ItemSummary, check=check_summary,
                   max_output_tokens=160)


def check_summary(context: dict, reply: ItemSummary) -> None:
    """A summary is what a customer reads for an item without a review-based persona: a reply that
    loops ("The best is the best, and the best is the best, ...") or says one sentence twice is
    re-asked, then the metadata text stands in (`fallback_summary`)."""
    if repetitive(reply.summary):
        raise ValueError("the summary repeats itself: say each thing once")


def repetitive(text: str) -> bool:
    """One sentence (of 4+ words) said twice, or one 4-word phrase three times."""
    sentences = [" ".join(re.findall(r"[a-z0-9']+", s.lower())) for s in re.split(r"[.!?]+", text)]
    said = [s for s in sentences if len(s.split()) >= 4]
    if len(said) != len(set(said)):
        return True
    words = re.findall(r"[a-z0-9']+", text.lower())
    grams: dict[tuple, int] = {}
    for i in range(len(words) - 3):
        g = tuple(words[i:i + 4])
        grams[g] = grams.get(g, 0) + 1
        if grams[g] >= 3:
            return True
    return False


def aspects_task(domain: str) -> LLMTask:
    return LLMTask("extract_aspects", load_prompt(domain, "aspects"), ReviewAspects, max_output_tokens=240)


def personas_task(domain: str, max_personas: int = 7) -> LLMTask:
    return LLMTask("build_personas", load_prompt(domain, "personas"), item_personas_model(max_personas),
                   check=check_personas, max_output_tokens=180 * max_personas)


def check_personas(context: dict, reply: ItemPersonas) -> None:
    limit = int(context.get("max_personas", 7))
    if len(reply.personas) > limit:
        raise ValueError(f"{len(reply.personas)} personas given, at most {limit} allowed")
    names = [p.name.strip().lower() for p in reply.personas]
    if len(set(names)) != len(names):
        raise ValueError("persona names must be distinct")


# -- item summary ----------------------------------------------------------------------------
def item_text(item: dict) -> str:
    """Metadata as labelled lines; empty fields are left out."""
    lines = []
    for label, key in (("Title", "title"), ("Brand", "brand"), ("Main category", "main_category")):
        if item.get(key):
            lines.append(f"{label}: {untrusted(item[key], 40)}")
    if item.get("categories") is not None and len(item["categories"]):
        lines.append("Categories: " + untrusted(", ".join(item["categories"]), 60))
    if item.get("description"):
        lines.append("Description: " + untrusted(item["description"], DESCRIPTION_TOKENS))
    if item.get("features") is not None and len(item["features"]):
        lines.append("Features: " + untrusted("; ".join(item["features"]), 120))
    details = item.get("details")
    if details:
        pairs = details.items() if isinstance(details, dict) else details
        lines.append("Details: " + untrusted("; ".join(f"{k}: {v}" for k, v in pairs), 80))
    if not lines:
        lines.append(f"Item id: {item['item_id']} (no metadata)")
    return "\n".join(lines)


def is_thin(item: dict) -> bool:
    return not item.get("title") or not item.get("description")


def summary_messages(domain: str, item: dict, reviews: Sequence[str], review_budget: int) -> list[dict]:
    block = ""
    if reviews:
        block = "\n" + "\n".join(f"<review>\n{untrusted(r, review_budget)}\n</review>" for r in reviews) + "\n"
    return summary_task(domain).prompt.render(item=item_text(item), reviews=block)


def fallback_summary(item: dict) -> str:
    """Used while the LLM summary has not succeeded, so every item stays describable."""
    text = " ".join(x for x in (item.get("title"), item.get("description")) if x)
    if not text and item.get("categories") is not None and len(item["categories"]):
        text = "An item in " + ", ".join(item["categories"])
    return untrusted(text or f"Item {item['item_id']}", 80)


# -- aspects ---------------------------------------------------------------------------------
def review_as_sent(review: str | None, review_budget: int) -> str:
    """The review as the aspect prompt shows it (what a reply's grounding is checked against)."""
    return untrusted(review, review_budget)


def aspect_messages(domain: str, summary: str, rating: float, review: str, review_budget: int) -> list[dict]:
    return aspects_task(domain).prompt.render(
        summary=untrusted(summary, 120), rating=f"{rating:g}", review=review_as_sent(review, review_budget))


_WORD = re.compile(r"\w+(?:'\w+)?")
# Words that carry no aspect: a reason made of them is grounded in any review or in none.
# ("not" and "no" stay content: "not durable" is not grounded in "durable".)
_STOP = frozenset("""a an and are as at be been but by for from had has have he her his i if in into is it its
    me my of on or our she so than that the their them then there these they this to too us was we were
    what when which who will with you your very really just also all any some more most much many can
    could would should do does did nor only own same such out up down over under again about""".split())


def content_words(text: str | None) -> set[str]:
    t = (text or "").casefold().replace("\u2019", "'").replace("\u2018", "'")
    return {w for w in _WORD.findall(t) if w not in _STOP and len(w) > 1 and not w.isdigit()}


def grounded(reason: str | None, review: str | None, min_share: float) -> bool:
    """Whether an aspect's reason is in the review: at least `min_share` of its content words
    occur there. A small model fills slots from the product summary it was shown ("The magazine
    offers a wide range of design ideas" for a review that says "Excellent!"); such a slot says
    nothing about this reviewer, so it is dropped rather than let it become a persona's evidence.
    A review with no content word to compare against (empty, or only stop words) grounds nothing
    and rejects nothing: the slot is kept."""
    review_words = content_words(review)
    if not review_words:
        return True
    words = content_words(reason)
    if not words:
        return False
    return len(words & review_words) >= min_share * len(words)


def ground_reply(reply: str | None, review: str | None, min_share: float) -> str | None:
    """A validated ReviewAspects reply (JSON) with every slot whose reason is not grounded in
    `review` set to null; unchanged when `min_share` is 0, the reply is missing, or it is not a
    JSON object of slots (a hand-edited cache row: left for the schema parse to reject)."""
    if not reply or min_share <= 0:
        return reply
    try:
        data = json.loads(reply)
    except ValueError:
        return reply
    if not isinstance(data, dict):
        return reply
    for slot in SLOTS:
        value = data.get(slot)
        if isinstance(value, dict) and not grounded(value.get("reason"), review, min_share):
            data[slot] = None
    return json.dumps(data)


# -- personas --------------------------------------------------------------------------------
def tuple_text(t: dict) -> str:
    parts = []
    for slot in SLOTS:
        if t.get(slot):
            reason = t.get(f"{slot}_reason")
            value = untrusted(t[slot], TUPLE_FIELD_TOKENS // 2)
            parts.append(f"{value} ({untrusted(reason, TUPLE_FIELD_TOKENS)})" if reason else value)
        else:
            parts.append("-")
    return f"[{t['rating']:g}] " + " | ".join(parts)


def _bucket(rating: float) -> int:
    return 0 if rating <= 2 else (1 if rating < 4 else 2)


def sample_pool(tuples: list[dict], token_budget: int) -> list[dict]:
    """The aspect pool an item's persona prompt sees, within `token_budget`.

    Rule (deterministic): split tuples by rating into negative (<=2), neutral (3) and positive
    (>=4); order each by helpful votes (desc), then by a hash of the reviewer id; then take one
    from each group in turn, smallest group first, until the budget is spent. So a few critical
    reviews are not crowded out by many positive ones, and the same pool gives the same prompt.
    """
    groups: dict[int, list[dict]] = {}
    for t in tuples:
        groups.setdefault(_bucket(t["rating"]), []).append(t)
    for g in groups.values():
        g.sort(key=lambda t: (-(t.get("helpful_votes") or 0),
                              hashlib.sha256(str(t["user_id"]).encode()).hexdigest()))
    order = sorted(groups, key=lambda b: (len(groups[b]), b))
    picked, used = [], 0
    while any(groups[b] for b in order):
        for b in order:
            if not groups[b]:
                continue
            t = groups[b].pop(0)
            cost = approx_tokens(tuple_text(t)) + 1
            if used + cost > token_budget and picked:
                return picked
            picked.append(t)
            used += cost
    return picked


def persona_messages(domain: str, summary: str, pool: list[dict], n_reviews: int, max_personas: int) -> list[dict]:
    return personas_task(domain, max_personas).prompt.render(
        summary=untrusted(summary, 120), n_reviews=n_reviews,
        aspects="\n".join(tuple_text(t) for t in pool), max_personas=max_personas)
