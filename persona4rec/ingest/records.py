"""Validation vocabulary shared by the format parsers: why a record is rejected, and the rules."""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum


class Reason(str, Enum):
    UNDECODABLE = "undecodable_bytes"
    MALFORMED = "malformed_json"
    NOT_AN_OBJECT = "not_an_object"
    MISSING_FIELD = "missing_field"
    WRONG_TYPE = "wrong_type"
    EMPTY_TEXT = "empty_text"
    OUT_OF_RANGE = "out_of_range"
    FUTURE_TIMESTAMP = "future_timestamp"
    TRUNCATED_FILE = "truncated_file"  # a compressed file that ends or breaks mid-stream


MAX_COUNT = 2**31 - 1  # helpful votes are an int column


class Rejected(Exception):
    """A record that cannot be kept; carries the reason code and the offending field."""

    def __init__(self, reason: Reason, field: str | None, message: str):
        super().__init__(message)
        self.reason = reason
        self.field = field
        self.message = message


@dataclass(frozen=True)
class Rules:
    rating_min: float
    rating_max: float
    max_ts: int  # latest acceptable Unix time in seconds


def required(obj: dict, field: str):
    value = obj.get(field)
    if value is None:
        raise Rejected(Reason.MISSING_FIELD, field, f"required field '{field}' is missing or null")
    return value


def as_id(obj: dict, field: str) -> str:
    value = required(obj, field)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise Rejected(Reason.WRONG_TYPE, field, f"'{field}' must be a string id, got {type(value).__name__}")
    value = str(value).strip()
    if not value:
        raise Rejected(Reason.MISSING_FIELD, field, f"required field '{field}' is empty")
    return value


def as_number(obj: dict, field: str) -> float:
    value = required(obj, field)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Rejected(Reason.WRONG_TYPE, field, f"'{field}' must be a number, got {str(value)[:40]!r}")
    try:
        number = float(value)
    except OverflowError:  # an int too large for a float
        number = math.inf
    if math.isnan(number):
        raise Rejected(Reason.WRONG_TYPE, field, f"'{field}' must be a number, got NaN")
    if not math.isfinite(number):
        raise Rejected(Reason.OUT_OF_RANGE, field, f"'{field}' is not a finite number (got {str(value)[:40]})")
    return number


def as_text(obj: dict, field: str) -> str:
    value = required(obj, field)
    if not isinstance(value, str):
        raise Rejected(Reason.WRONG_TYPE, field, f"'{field}' must be text, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise Rejected(Reason.EMPTY_TEXT, field, f"'{field}' is empty")
    return value


def optional_text(obj: dict, field: str) -> str | None:
    value = obj.get(field)
    if value is None:
        return None
    if not isinstance(value, str):
        raise Rejected(Reason.WRONG_TYPE, field, f"'{field}' must be text, got {type(value).__name__}")
    return value.strip() or None


def optional_count(obj: dict, field: str) -> int | None:
    """Vote counts: ints, or strings like "1,234" (Amazon 2018 writes them so)."""
    value = obj.get(field)
    if value is None:
        return None
    if isinstance(value, bool):
        raise Rejected(Reason.WRONG_TYPE, field, f"'{field}' must be a count, got {value!r}")
    if isinstance(value, str):
        digits = value.replace(",", "").strip()
        if not (digits.isascii() and digits.isdigit()):
            raise Rejected(Reason.WRONG_TYPE, field, f"'{field}' must be a count, got {value[:40]!r}")
        return check_count(int(digits), field)
    if isinstance(value, int) and value >= 0:
        return check_count(value, field)
    raise Rejected(Reason.WRONG_TYPE, field, f"'{field}' must be a non-negative count, got {str(value)[:40]}")


def check_count(value: int, field: str) -> int:
    if value > MAX_COUNT:
        raise Rejected(Reason.OUT_OF_RANGE, field, f"'{field}'={str(value)[:40]} is above the largest count "
                                                   f"kept ({MAX_COUNT})")
    return value


def optional_bool(obj: dict, field: str) -> bool | None:
    value = obj.get(field)
    if value is None or isinstance(value, bool):
        return value
    raise Rejected(Reason.WRONG_TYPE, field, f"'{field}' must be true or false, got {value!r}")


def check_rating(value: float, field: str, rules: Rules) -> float:
    if not rules.rating_min <= value <= rules.rating_max:
        raise Rejected(Reason.OUT_OF_RANGE, field,
                       f"'{field}'={value} is outside the rating scale [{rules.rating_min}, {rules.rating_max}]")
    return value


def check_ts(ts: int, field: str, rules: Rules) -> int:
    if ts <= 0:
        raise Rejected(Reason.OUT_OF_RANGE, field, f"'{field}' gives a non-positive time {ts}")
    if ts > rules.max_ts:
        # No clock time in the message: a rerun must write the same rejected record.
        raise Rejected(Reason.FUTURE_TIMESTAMP, field,
                       f"'{field}' gives {ts}, later than the time of ingest plus ingest.max_clock_skew_s")
    return ts
