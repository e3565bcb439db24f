"""Versioned prompt templates (`persona4rec/prompts/<domain>/<task>.txt`) and safe rendering.

A template file starts with `version: N`, then `--- system` and `--- user` sections with
`{placeholders}`. The version and the text both enter the cache key, so editing a prompt means new
calls, never a stale cached answer. Third-party text is rendered as data: angle brackets are
replaced so a review cannot close its `<review>` block, and long text is cut to a token budget.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources

CHARS_PER_TOKEN = 4  # rough, tokenizer-free estimate used for budgets and rate limiting
_SECTION = re.compile(r"^--- (system|user)\s*$", re.MULTILINE)


@dataclass(frozen=True)
class Prompt:
    domain: str
    task: str
    version: str
    system: str
    user: str

    @property
    def fingerprint(self) -> str:
        """Version plus a hash of the text: part of every cache key."""
        digest = hashlib.sha256((self.system + "\x00" + self.user).encode()).hexdigest()[:12]
        return f"{self.task}/{self.domain}/v{self.version}-{digest}"

    def render(self, **values: object) -> list[dict]:
        return [{"role": "system", "content": self.system.strip()},
                {"role": "user", "content": self.user.strip().format(**values)}]


@lru_cache(maxsize=None)
def load_prompt(domain: str, task: str) -> Prompt:
    path = resources.files("persona4rec") / "prompts" / domain / f"{task}.txt"
    if not path.is_file():
        raise FileNotFoundError(f"no prompt '{task}' for domain '{domain}' (looked for {path})")
    text = path.read_text(encoding="utf-8")
    head, _, body = text.partition("\n")
    if not head.startswith("version:"):
        raise ValueError(f"prompt {path} must start with 'version: N'")
    parts = _SECTION.split(body)
    sections = dict(zip(parts[1::2], parts[2::2]))
    if set(sections) != {"system", "user"}:
        raise ValueError(f"prompt {path} needs exactly a '--- system' and a '--- user' section")
    return Prompt(domain, task, head.split(":", 1)[1].strip(), sections["system"], sections["user"])


def approx_tokens(text: str) -> int:
    return (len(text) + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def untrusted(text: str | None, token_budget: int) -> str:
    """Third-party text as inert data: no angle brackets (cannot open or close our blocks), no
    NULs, cut to about `token_budget` tokens at a word boundary, marked when cut."""
    if not text:
        return ""
    clean = text.replace("\x00", " ").replace("<", "‹").replace(">", "›").strip()
    limit = token_budget * CHARS_PER_TOKEN
    if len(clean) <= limit:
        return clean
    cut = clean[:limit]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut) + " [...]"
