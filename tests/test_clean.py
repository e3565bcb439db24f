import pytest

from persona4rec.ingest.clean import clean_details, clean_list, clean_text

pytestmark = pytest.mark.unit


def test_truncated_html_title_becomes_missing():
    # Real value from the 2018 Magazine_Subscriptions metadata.
    assert clean_text('<span class="a-size-medium a-color-secondary"') is None


def test_markup_and_entities_are_removed():
    assert clean_text("Arts, Music &amp; Photography") == "Arts, Music & Photography"
    assert clean_text("<b>Guitar</b>  Player\n<br/>Magazine") == "Guitar Player Magazine"
    assert clean_text("&lt;script&gt;alert(1)&lt;/script&gt;Safe") == "alert(1) Safe"


def test_lists_are_cleaned_flattened_and_deduplicated():
    assert clean_list(["A &amp; B", "", "<i>C</i>", ["D", "C"], "A & B"]) == ["A & B", "C", "D"]
    assert clean_list([]) is None
    assert clean_list("solo") == ["solo"]


def test_details_keys_are_tidied_and_sorted():
    assert clean_details({"Publisher:": "Reason", "ASIN: ": "B0", "empty": ""}) == \
        {"ASIN": "B0", "Publisher": "Reason"}
    assert clean_details("not a dict") is None
