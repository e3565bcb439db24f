"""Format parsers and validation rules, without Spark."""

import pytest

from persona4rec.ingest.formats import decode_object, item_parser, review_parser
from persona4rec.ingest.readers import parse_records
from persona4rec.ingest.records import Reason, Rejected, Rules

pytestmark = pytest.mark.unit

RULES = Rules(rating_min=1.0, rating_max=5.0, max_ts=2_000_000_000)


def amazon2014(**kw):
    row = {"reviewerID": "U1", "asin": "I1", "overall": 4.0, "unixReviewTime": 1393545600,
           "reviewText": "Works well.", "summary": "good", "helpful": [2, 3]}
    row.update(kw)
    return {k: v for k, v in row.items() if v is not ...}


def test_amazon2014_review():
    out = review_parser("amazon2014")(amazon2014(), RULES)
    assert out == {"user_id": "U1", "item_id": "I1", "rating": 4.0, "ts": 1393545600,
                   "review_title": "good", "review_text": "Works well.", "helpful_votes": 2,
                   "verified": None}


def test_amazon2018_review_vote_string_and_verified():
    out = review_parser("amazon2018")(amazon2014(helpful=..., vote="1,234", verified=True), RULES)
    assert out["helpful_votes"] == 1234 and out["verified"] is True


def test_amazon2023_review_uses_parent_asin_and_ms():
    obj = {"user_id": "AG1", "asin": "B01", "parent_asin": "B00P", "rating": 5.0,
           "timestamp": 1588687728923, "title": "Nice", "text": "Great pen.",
           "verified_purchase": True, "helpful_vote": 0}
    out = review_parser("amazon2023")(obj, RULES)
    assert (out["item_id"], out["ts"], out["helpful_votes"]) == ("B00P", 1588687728, 0)
    del obj["parent_asin"]
    assert review_parser("amazon2023")(obj, RULES)["item_id"] == "B01"


def test_yelp_review_parses_date_as_utc():
    obj = {"review_id": "r", "user_id": "u", "business_id": "b", "stars": 3,
           "date": "2018-07-07 22:09:11", "text": "Tasty.", "useful": 2}
    out = review_parser("yelp")(obj, RULES)
    assert out["ts"] == 1531001351 and out["rating"] == 3.0 and out["item_id"] == "b"


@pytest.mark.parametrize("fmt, obj, reason, field", [
    ("amazon2014", amazon2014(reviewerID=...), Reason.MISSING_FIELD, "reviewerID"),
    ("amazon2014", amazon2014(asin=""), Reason.MISSING_FIELD, "asin"),
    ("amazon2014", amazon2014(overall="five"), Reason.WRONG_TYPE, "overall"),
    ("amazon2014", amazon2014(overall=True), Reason.WRONG_TYPE, "overall"),
    ("amazon2014", amazon2014(reviewText="   "), Reason.EMPTY_TEXT, "reviewText"),
    ("amazon2014", amazon2014(reviewText=...), Reason.MISSING_FIELD, "reviewText"),
    ("amazon2014", amazon2014(overall=7.0), Reason.OUT_OF_RANGE, "overall"),
    ("amazon2014", amazon2014(overall=0), Reason.OUT_OF_RANGE, "overall"),
    ("amazon2014", amazon2014(unixReviewTime=4_102_444_800), Reason.FUTURE_TIMESTAMP, "unixReviewTime"),
    ("amazon2014", amazon2014(unixReviewTime=-5), Reason.OUT_OF_RANGE, "unixReviewTime"),
    ("amazon2014", amazon2014(helpful="x"), Reason.WRONG_TYPE, "helpful"),
    ("yelp", {"user_id": "u", "business_id": "b", "stars": 3, "date": "yesterday", "text": "t"},
     Reason.WRONG_TYPE, "date"),
])
def test_bad_values_are_rejected_with_reason_and_field(fmt, obj, reason, field):
    with pytest.raises(Rejected) as err:
        review_parser(fmt)(obj, RULES)
    assert (err.value.reason, err.value.field) == (reason, field)
    assert field in err.value.message


def test_decode_object_rejects_malformed_and_non_objects():
    with pytest.raises(Rejected) as err:
        decode_object('{"a": 1', "amazon2018")
    assert err.value.reason == Reason.MALFORMED
    with pytest.raises(Rejected) as err:
        decode_object("[1, 2]", "amazon2018")
    assert err.value.reason == Reason.NOT_AN_OBJECT


def test_amazon2014_metadata_python_literal_lines_are_read():
    line = "{'asin': '0006428320', 'title': 'Six Sonatas', 'categories': [['Musical Instruments', 'Keys']]}"
    item = item_parser("amazon2014")(decode_object(line, "amazon2014"))
    assert item["title"] == "Six Sonatas"
    assert item["categories"] == ["Musical Instruments", "Keys"]
    with pytest.raises(Rejected):
        decode_object(line, "amazon2018")  # only the 2014 format is allowed Python literals


def test_amazon2018_item_cleans_html_title_and_lists():
    obj = {"asin": "B00005N7OC", "title": '<span class="a-size-medium a-color-secondary"',
           "description": ["Written by and for musicians.", "", ""],
           "category": ["Magazine Subscriptions", "Arts, Music &amp; Photography"],
           "brand": "String Letter Publishers", "main_cat": "Magazine Subscriptions",
           "details": {"Publisher:": "String Letter Publishers"}}
    item = item_parser("amazon2018")(obj)
    assert item["title"] is None
    assert item["description"] == "Written by and for musicians."
    assert item["categories"] == ["Magazine Subscriptions", "Arts, Music & Photography"]
    assert item["details"] == {"Publisher": "String Letter Publishers"}


def test_amazon2023_and_yelp_items():
    a = item_parser("amazon2023")({"parent_asin": "P1", "title": "Pen", "main_category": "Office",
                                   "categories": ["Office", "Pens"], "features": ["Fine tip"],
                                   "description": ["Blue ink."], "store": "Pilot",
                                   "details": {"Weight": "10 g", "Dims": {"w": 1}}})
    assert (a["item_id"], a["brand"], a["features"]) == ("P1", "Pilot", ["Fine tip"])
    assert a["details"] == {"Dims": '{"w": 1}', "Weight": "10 g"}
    y = item_parser("yelp")({"business_id": "b1", "name": "Joe's &amp; Co", "city": "Tucson",
                             "categories": "Restaurants, Pizza", "attributes": {"WiFi": "free"}})
    assert y["title"] == "Joe's & Co" and y["categories"] == ["Restaurants", "Pizza"]
    assert y["main_category"] == "Restaurants" and y["details"]["WiFi"] == "free"


def test_parse_records_keeps_raw_text_for_rejects_and_flags_undecodable_bytes():
    parse = review_parser("amazon2014")
    rows = list(parse_records([
        ("f", 1, b'{"reviewerID": "U", "asin": "I", "overall": 5, "unixReviewTime": 1, "reviewText": "ok"}'),
        ("f", 2, b'{"reviewerID": "U", "asin": "I2", "reviewText": "caf\xe9"}'),
        ("f", 3, b'not json'),
    ], lambda o: parse(o, RULES), "amazon2014"))
    assert rows[0]["_reason"] is None and rows[0]["user_id"] == "U"
    assert rows[1]["_reason"] == "undecodable_bytes" and "\\xe9" in rows[1]["_raw"]
    assert rows[2]["_reason"] == "malformed_json" and rows[2]["_raw"] == "not json"
    assert [r["source_line"] for r in rows] == [1, 2, 3]


def test_unknown_format_says_what_to_set():
    with pytest.raises(ValueError, match="ingest.format"):
        review_parser("csv")
