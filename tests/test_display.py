"""Display names: the catalogue's title, else a name derived from the metadata and marked."""

from persona4rec.display import DERIVED_MARK, derived_name, display_name, shown


def test_a_title_is_shown_as_is():
    assert display_name({"item_id": "I1", "title": "Wired", "description": "Other Name is great"}) == ("Wired", False)


def test_names_derived_from_real_sample_descriptions():
    # Descriptions from the shipped sample (Amazon 2018 Magazine Subscriptions), whose titles are
    # cut-off HTML fragments.
    cases = {
        "Good Housekeeping magazine, together with the Good Housekeeping Institute and the Good Housekeeping "
        "Seal": "Good Housekeeping",
        "Satisfy your passion for stylish living. Who Reads House Beautiful? The House Beautiful reader is "
        "someone whose home is her bedrock.": "House Beautiful",
        "Tackle any home improvement project or repair with help from The Family Handyman.": "The Family Handyman",
        "O, The Oprah Magazine gives confident, smart women the tools they need": "The Oprah Magazine",
        "The 'What's New'\" magazine of science and technology.": "What's New",
        "Better Homes & Gardens offers beautiful photography": "Better Homes & Gardens",
    }
    for text, name in cases.items():
        assert derived_name(text, "Hearst Magazines") == name, text


def test_the_publisher_is_not_the_name_and_metadata_is_the_last_resort():
    assert derived_name("Hearst Magazines presents Country Living.", "Hearst Magazines") == "Country Living"
    assert derived_name("Its everything you need, in one easy read!", "Trusted Media Brands",
                        ["Magazine Subscriptions", "Literary Magazines"]) == "Trusted Media Brands Literary Magazines"
    item = {"item_id": "B0X", "title": None, "description": None, "brand": None, "categories": None}
    assert display_name(item) == ("Item B0X", True)
    assert shown({**item, "description": ["Redbook is the must-read magazine"]}) == "Redbook" + DERIVED_MARK
