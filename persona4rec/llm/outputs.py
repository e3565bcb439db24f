"""Pydantic models of what each LLM task must return.

String lengths are bounded in the JSON schema on purpose: with constrained decoding a small model
otherwise loops until the token limit, and any model's reply stays a predictable size in tables
and e-mails.
"""

from __future__ import annotations

from functools import lru_cache

from pydantic import BaseModel, ConfigDict, Field, create_model

SLOTS = ("category_preference", "purchase_purpose", "quality_criteria", "usage_context")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ItemSummary(_Strict):
    summary: str = Field(min_length=1, max_length=320,
                         description="2-3 sentences: what the item is and who it is for")


class AspectSlot(_Strict):
    value: str = Field(min_length=1, max_length=48, description="the aspect, in a few words")
    reason: str = Field(min_length=1, max_length=100, description="why, from the review")


class ReviewAspects(_Strict):
    category_preference: AspectSlot | None = None
    purchase_purpose: AspectSlot | None = None
    quality_criteria: AspectSlot | None = None
    usage_context: AspectSlot | None = None

    def null_slots(self) -> int:
        return sum(getattr(self, s) is None for s in SLOTS)


class Persona(_Strict):
    name: str = Field(min_length=1, max_length=50)
    description: str = Field(min_length=1, max_length=200)
    preference_rationale: str = Field(min_length=1, max_length=200)


class ItemPersonas(_Strict):
    personas: list[Persona] = Field(min_length=1, max_length=7)


@lru_cache(maxsize=None)
def item_personas_model(max_personas: int) -> type[ItemPersonas]:
    """ItemPersonas whose schema allows at most `max_personas`, so constrained decoding cannot
    exceed the configured cap (the class keeps its name: the schema name the endpoint sees)."""
    if max_personas == 7:
        return ItemPersonas
    return create_model("ItemPersonas", __base__=ItemPersonas,
                        personas=(list[Persona], Field(min_length=1, max_length=max_personas)))


def response_schema(model: type[BaseModel]) -> dict:
    """JSON schema for `response_format`, self-contained (no $ref) for endpoints that need it."""
    schema = model.model_json_schema()
    defs = schema.pop("$defs", {})

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].split("/")[-1]])
            return {k: inline(v) for k, v in node.items() if k not in ("title", "default")}
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(schema)


class AlignmentChoice(_Strict):
    persona_number: int = Field(ge=1, le=7, description="1-based number of the chosen persona")
    justification: str = Field(min_length=1, max_length=400)
