"""What reaches an inbox: persona names and explanations carry no link, address or number, whatever
a hostile review made the LLM write (an adversarial corpus; the end-to-end run is in test_pipeline)."""

import re
import unicodedata

import numpy as np
import pytest

from persona4rec.scoring import explain
from persona4rec.scoring.explain import explanation, plain_text, sanitize

pytestmark = pytest.mark.unit

# An independent check, looser than the sanitizer: anything a reader or a mail client could follow.
LINKISH = re.compile(r"(?i)[a-z]+\s*:\s*//|\bwww\b|@|\(at\)|\b[a-z0-9-]+\.(?:[a-z]{2,}|xn--)|\d[\d\s().-]{6,}\d"
                     r"|\bxn--")

ATTACKS = [
    "Visit evil.xyz/free for more", "bit.do/x", "see evil.example/x today", "evil.example",
    "evil&lt;b&gt;.com", "evil&amp;lt;b&amp;gt;.com", "evil<b>.com", "<a href='https://evil.com'>click</a>",
    "http ://evil.com/x", "http : // evil.com", "https://evil.com/?q=a b", "hxxp://evil.com", "hxxps://evil[.]com",
    "ftp://files.evil.org", "EVIL.COM/X", "www.evil", "www . evil . com", "evil .com", "evil. com/x",
    "evil\u200b.com", "e\u200bvil.c\u200bom", "evil\u2060.com", "evil\ufeff.com", "ev\u00adil.com",
    "evil\uff0ecom", "evil\u3002com", "evil\uff61com", "evil\u2024com", "evil\u00b7com", "\uff45\uff56\uff49\uff4c.com",
    "xn--80ak6aa92e.com", "example.xn--p1ai", "xn--e1afmkfd.xn--80akhbyknj4f/x",
    "write to bob@evil.com", "bob (at) evil (dot) com", "bob [at] evil.com", "b\u200bob@evil.com",
    "call +1 (555) 123-4567", "call 555.123.4567", "192.168.0.1:8080/admin", "mailto:bob@evil.com",
    "[link](https://evil.com)", "Click here: h\u200bttps://evil.com", "&#104;ttp://evil.com",
    "&#x68;&#x74;&#x74;&#x70;://evil.com", "evil<!-- -->.com", "evil&#46;com", "evil&period;com",
]


@pytest.mark.parametrize("attack", ATTACKS)
def test_no_link_survives_in_names_or_explanations(attack):
    text = f"Jazz lover who reads every issue. {attack} Honest and warm."
    for out in (sanitize(text, 500), sanitize(attack, 60), explanation(attack, text, attack, 240)):
        visible = unicodedata.normalize("NFKC", out)
        assert not LINKISH.search(visible), (attack, out)
        assert plain_text(out) == out  # a fixed point: another pass changes nothing


def test_ordinary_prose_survives():
    text = "Jazz · Blues lover: reads it for 3.5mm gear reviews, e.g. in U.S. studios. Honest, warm & witty!"
    assert sanitize(text, 500) == "Jazz · Blues lover: reads it for 3.5mm gear reviews, e.g. in U.S. studios. " \
                                  "Honest, warm & witty!"
    assert sanitize("word " * 200, 50).endswith("…") and len(sanitize("word " * 200, 50)) <= 50


def _unguarded_clean_once(text: str) -> str:
    """_clean_once as it was before the hints and the ASCII fold: every pattern always applied."""
    t = explain._decode(text)
    t = unicodedata.normalize("NFKC", t)
    t = explain._INVISIBLE.sub("", t)
    t = explain._DOTS.sub(".", t)
    t = "".join(" " if unicodedata.category(c)[0] in "CZ" and c not in "\n\t" else c for c in t)
    t = explain._SPACE.sub(" ", t)
    t = re.sub(r"\s+([,.;:!?])", r"\1", t)
    t = re.sub(r"([,;:])(?:[,;:\s])+", r"\1 ", t)
    for p in (explain._EMAIL, explain._URL, explain._PHONE, explain._MARKDOWN):
        t = p.sub(" ", t)
    t = explain._SPACE.sub(" ", t)
    return re.sub(r"\s+([,.;:!?])", r"\1", t).strip(" .;,:-")


@pytest.mark.parametrize("text", [*ATTACKS, "Plays at home after work. Wants a reliable\tinstrument\x07 (42 reviews).",
                                  "e.g. a 3.5 mm jack", "Great for kids!  Age 6+", "ftp :// x", "WWW\x0b.x.io"])
def test_the_fast_paths_change_nothing(text):
    # the hints skip a pattern only where it cannot match; ASCII folds like the per-character loop
    assert explain._clean_once(text) == _unguarded_clean_once(text)
    random = np.random.default_rng(len(text))
    alphabet = list("ab.:/@ (at)w1 9-\t\x01\u00b7\u200bé")
    for _ in range(200):
        s = "".join(random.choice(alphabet, size=int(random.integers(1, 40))))
        assert explain._clean_once(s) == _unguarded_clean_once(s), repr(s)
