"""Source formats → the normalised `reviews` and `items` rows.

Plain functions from one decoded JSON object to one dict of normalised fields (or `Rejected`),
so each format is testable without Spark and adding a format is adding two functions.
"""

from __future__ import annotations

import ast
import json
from datetime import datetime, timezone
from typing import Callable

from persona4rec.ingest.clean import clean_details, clean_list, clean_text
from persona4rec.ingest.records import (
    Reason, Rejected, Rules, as_id, as_number, as_text, check_count, check_rating, check_ts, optional_bool,
    optional_count, optional_text, required,
)

FORMATS = ("amazon2014", "amazon2018", "amazon2023", "yelp")


# -- reviews ---------------------------------------------------------------------------------
def _amazon_classic_review(obj: dict, rules: Rules) -> dict:
    """Amazon 2014/2018: reviewerID, asin, overall, unixReviewTime (s), reviewText, summary."""
    ts = as_number(obj, "unixReviewTime")
    return {
        "user_id": as_id(obj, "reviewerID"),
        "item_id": as_id(obj, "asin"),
        "rating": check_rating(as_number(obj, "overall"), "overall", rules),
        "ts": check_ts(int(ts), "unixReviewTime", rules),
        "review_title": optional_text(obj, "summary"),
        "review_text": as_text(obj, "reviewText"),
        "helpful_votes": _amazon_helpful(obj),
        "verified": optional_bool(obj, "verified"),
    }


def _amazon_helpful(obj: dict) -> int | None:
    if "vote" in obj:  # 2018: "vote": "3"
        return optional_count(obj, "vote")
    helpful = obj.get("helpful")  # 2014: [helpful, total]
    if helpful is None:
        return None
    if isinstance(helpful, list) and len(helpful) == 2 and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in helpful):
        return check_count(helpful[0], "helpful")
    raise Rejected(Reason.WRONG_TYPE, "helpful", f"'helpful' must be [helpful, total], got {helpful!r}")


def _amazon2023_review(obj: dict, rules: Rules) -> dict:
    """Amazon Reviews 2023: items are grouped by parent_asin (the paper's choice); ts in ms."""
    item = obj.get("parent_asin") if obj.get("parent_asin") not in (None, "") else None
    ts_ms = as_number(obj, "timestamp")
    return {
        "user_id": as_id(obj, "user_id"),
        "item_id": as_id(obj, "parent_asin") if item is not None else as_id(obj, "asin"),
        "rating": check_rating(as_number(obj, "rating"), "rating", rules),
        "ts": check_ts(int(ts_ms // 1000), "timestamp", rules),
        "review_title": optional_text(obj, "title"),
        "review_text": as_text(obj, "text"),
        "helpful_votes": optional_count(obj, "helpful_vote"),
        "verified": optional_bool(obj, "verified_purchase"),
    }


def _yelp_review(obj: dict, rules: Rules) -> dict:
    """Yelp academic: user_id, business_id, stars, date ('YYYY-MM-DD HH:MM:SS', UTC), text."""
    raw_date = required(obj, "date")
    if not isinstance(raw_date, str):
        raise Rejected(Reason.WRONG_TYPE, "date", f"'date' must be text, got {raw_date!r}")
    try:
        when = datetime.fromisoformat(raw_date.strip()).replace(tzinfo=timezone.utc)
    except ValueError:
        raise Rejected(Reason.WRONG_TYPE, "date", f"'date' is not a date: {raw_date!r}") from None
    return {
        "user_id": as_id(obj, "user_id"),
        "item_id": as_id(obj, "business_id"),
        "rating": check_rating(as_number(obj, "stars"), "stars", rules),
        "ts": check_ts(int(when.timestamp()), "date", rules),
        "review_title": None,
        "review_text": as_text(obj, "text"),
        "helpful_votes": optional_count(obj, "useful"),
        "verified": None,
    }


# -- items -----------------------------------------------------------------------------------
def _amazon_classic_item(obj: dict) -> dict:
    """Amazon 2014/2018 metadata: asin, title, description (str or list), categories/category."""
    cats = obj.get("category") if obj.get("category") is not None else obj.get("categories")
    return {
        "item_id": as_id(obj, "asin"),
        "title": clean_text(obj.get("title")),
        "description": _join(clean_list(obj.get("description"))),
        "categories": clean_list(cats),
        "brand": clean_text(obj.get("brand")),
        "main_category": clean_text(obj.get("main_cat")),
        "features": clean_list(obj.get("feature")),
        "details": clean_details(obj.get("details")),
    }


def _amazon2023_item(obj: dict) -> dict:
    return {
        "item_id": as_id(obj, "parent_asin"),
        "title": clean_text(obj.get("title")),
        "description": _join(clean_list(obj.get("description"))),
        "categories": clean_list(obj.get("categories")),
        "brand": clean_text(obj.get("store")),
        "main_category": clean_text(obj.get("main_category")),
        "features": clean_list(obj.get("features")),
        "details": clean_details(obj.get("details")),
    }


def _yelp_item(obj: dict) -> dict:
    cats = obj.get("categories")
    if isinstance(cats, str):
        cats = [c.strip() for c in cats.split(",")]
    details = {k: obj.get(k) for k in ("city", "state", "address", "stars", "review_count")
               if obj.get(k) not in (None, "")}
    if isinstance(obj.get("attributes"), dict):
        details.update(obj["attributes"])
    return {
        "item_id": as_id(obj, "business_id"),
        "title": clean_text(obj.get("name")),
        "description": None,
        "categories": clean_list(cats),
        "brand": None,
        "main_category": "Restaurants" if cats and "Restaurants" in cats else None,
        "features": None,
        "details": clean_details(details),
    }


def _join(parts: list[str] | None) -> str | None:
    return "\n".join(parts) if parts else None


ReviewParser = Callable[[dict, Rules], dict]
ItemParser = Callable[[dict], dict]

REVIEW_PARSERS: dict[str, ReviewParser] = {
    "amazon2014": _amazon_classic_review,
    "amazon2018": _amazon_classic_review,
    "amazon2023": _amazon2023_review,
    "yelp": _yelp_review,
}
ITEM_PARSERS: dict[str, ItemParser] = {
    "amazon2014": _amazon_classic_item,
    "amazon2018": _amazon_classic_item,
    "amazon2023": _amazon2023_item,
    "yelp": _yelp_item,
}


def decode_object(text: str, fmt: str) -> dict:
    """One line → one JSON object. Amazon's 2014 metadata files are Python literals, not JSON
    (single quotes), so for that format a line that is not JSON gets a literal_eval try."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        obj = None
        if fmt == "amazon2014":
            try:
                obj = ast.literal_eval(text)
            except (ValueError, SyntaxError, MemoryError, RecursionError):
                obj = None
        if obj is None:
            raise Rejected(Reason.MALFORMED, None, f"not valid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict):
        raise Rejected(Reason.NOT_AN_OBJECT, None, f"expected a JSON object, got {type(obj).__name__}")
    return obj


def review_parser(fmt: str) -> ReviewParser:
    if fmt not in REVIEW_PARSERS:
        raise ValueError(f"unknown review format '{fmt}'; use one of {list(REVIEW_PARSERS)} (ingest.format)")
    return REVIEW_PARSERS[fmt]


def item_parser(fmt: str) -> ItemParser:
    if fmt not in ITEM_PARSERS:
        raise ValueError(f"unknown item format '{fmt}'; use one of {list(ITEM_PARSERS)} (ingest.format)")
    return ITEM_PARSERS[fmt]
