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


BOUNDED, OPENAI_STRICT = "bounded", "openai_strict"
# Keywords OpenAI's strict structured outputs accept (its "supported schemas" guide); anything else
# makes the request fail with a 400.
STRICT_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "anyOf", "enum", "const",
    "description", "minItems", "maxItems", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum",
    "multipleOf", "pattern", "format"})


def response_schema(model: type[BaseModel], dialect: str = BOUNDED) -> dict:
    """JSON schema for `response_format`, self-contained (no $ref) for endpoints that need it.

    `bounded` keeps every string's length bounds: llama.cpp (the embedded server) and vLLM
    enforce them while decoding, which stops a small model looping to the token limit.
    `openai_strict` is what OpenAI's strict mode accepts: every property required (an optional
    one is a union with null), `additionalProperties: false` on every object, and only the
    supported keywords — the length bounds move into the description (the prompt) and stay in the
    reply's validation, which re-asks when a reply breaks them."""
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

    flat = inline(schema)
    return _strict(flat) if dialect == OPENAI_STRICT else flat


def _strict(node):
    if isinstance(node, list):
        return [_strict(v) for v in node]
    if not isinstance(node, dict):
        return node
    out = {k: ({name: _strict(child) for name, child in v.items()} if k == "properties" else _strict(v))
           for k, v in node.items() if k in STRICT_KEYWORDS}
    if node.get("type") == "object" or "properties" in node:
        out["required"] = list(node.get("properties", {}))
        out["additionalProperties"] = False
    bounds = [f"at least {node['minLength']}" if node.get("minLength", 0) > 1 else "",
              f"at most {node['maxLength']}" if "maxLength" in node else ""]
    said = " and ".join(b for b in bounds if b)
    if said:
        out["description"] = f"{node.get('description', '')} ({said} characters)".strip()
    return out


def strict_violations(schema: dict) -> list[str]:
    """Why OpenAI's strict mode would refuse `schema` (empty: it would accept it)."""
    problems: list[str] = []

    def walk(node, path):
        if isinstance(node, list):
            for i, v in enumerate(node):
                walk(v, f"{path}[{i}]")
            return
        if not isinstance(node, dict):
            return
        for key in node:
            if key not in STRICT_KEYWORDS:
                problems.append(f"{path}: keyword '{key}' is not supported in strict mode")
        if node.get("type") == "object" or "properties" in node:
            if node.get("additionalProperties") is not False:
                problems.append(f"{path}: additionalProperties must be false")
            missing = [p for p in node.get("properties", {}) if p not in node.get("required", [])]
            if missing:
                problems.append(f"{path}: properties {missing} are not in required")
        for key in ("properties",):
            for name, child in node.get(key, {}).items():
                walk(child, f"{path}.{name}")
        for key in ("items", "anyOf"):
            if key in node:
                walk(node[key], f"{path}.{key}")

    if schema.get("type") != "object" or "anyOf" in schema:
        problems.append("root: must be an object, not a union")
    walk(schema, "root")
    return problems


class AlignmentChoice(_Strict):
    persona_number: int = Field(ge=1, le=7, description="1-based number of the chosen persona")
    justification: str = Field(min_length=1, max_length=400)
