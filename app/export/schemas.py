"""Row schemas beside TRL's standard one: the same comparisons and demonstrations, shaped for other consumers.

The default `trl` rows (`prompt` as text) are built on the fast path in `app.export.rows`; a `schema` maps
each of those rows, with its prompt's conversation, to another shape. Every schema keeps one row per row of
the default export, in the same order and with the same `cursor`, so resuming works the same way.

- `trl_chat`: TRL's conversational format. Comparisons: `prompt` is the conversation (a list of messages),
  `chosen` and `rejected` are one-message assistant lists; demonstrations: `messages` is the conversation
  followed by the demonstration as the assistant's message. Provenance columns as in `trl`.
- `openai`: OpenAI fine-tuning JSONL. Comparisons are preference rows, `input.messages`, `preferred_output`
  and `non_preferred_output` (one-message assistant lists); demonstrations are chat rows, `messages`. Only
  `cursor` rides along (for resuming); drop it if an uploader refuses unknown keys.
- `hh_rlhf`: Anthropic HH transcripts, each turn as `\\n\\nHuman: …` or `\\n\\nAssistant: …` (a system message
  comes first, bare). Comparisons: `chosen` and `rejected` are whole transcripts ending with the output;
  demonstrations: `prompt` is the transcript up to `\\n\\nAssistant:`, `completion` the answer after a space.
  Provenance columns as in `trl`.

These schemas nest lists, so they are JSON Lines only; the rankings export keeps its own lossless shape.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from app.conversations import Message, messages_of

SCHEMAS = ("trl", "trl_chat", "openai", "hh_rlhf")
SCHEMA_KINDS = ("comparisons", "demonstrations")
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_TEXT_FIELDS = ("prompt", "chosen", "rejected", "completion")


def schema_problem(kind: str, fmt: str, schema: str) -> str | None:
    """Says why an export cannot be given in this schema, or None when it can."""
    if schema not in SCHEMAS:
        return f"must be one of {', '.join(SCHEMAS)}"
    if schema == "trl":
        return None
    if kind not in SCHEMA_KINDS:
        return f"{schema} applies to the comparisons and demonstrations exports; rankings are exported as they are"
    if fmt != "jsonl":
        return f"{schema} rows hold lists of messages, so they are JSON Lines only (format=jsonl)"
    return None


def _assistant(text: str) -> list[Message]:
    return [{"role": "assistant", "content": text}]


def hh_transcript(messages: Sequence[Message]) -> str:
    """Renders a conversation as an HH-RLHF transcript, ending after its last message (no trailing Assistant:)."""
    parts = []
    for m in messages:
        if m["role"] == "system":
            parts.append(m["content"])
        else:
            parts.append(("\n\nHuman: " if m["role"] == "user" else "\n\nAssistant: ") + m["content"])
    return "".join(parts)


def _provenance(record: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in _TEXT_FIELDS}


def comparison_in_schema(record: dict[str, Any], messages: list[Message], schema: str) -> dict[str, Any]:
    """Maps one default comparison row (`prompt`, `chosen`, `rejected`, provenance) to a schema."""
    chosen, rejected = record["chosen"], record["rejected"]
    if schema == "trl_chat":
        return {"prompt": messages, "chosen": _assistant(chosen), "rejected": _assistant(rejected)} | _provenance(
            record
        )
    if schema == "openai":
        return {
            "input": {"messages": messages},
            "preferred_output": _assistant(chosen),
            "non_preferred_output": _assistant(rejected),
            "cursor": record["cursor"],
        }
    if schema == "hh_rlhf":
        transcript = hh_transcript(messages)
        return {
            "chosen": f"{transcript}\n\nAssistant: {chosen}",
            "rejected": f"{transcript}\n\nAssistant: {rejected}",
        } | _provenance(record)
    return record


def demonstration_in_schema(record: dict[str, Any], messages: list[Message], schema: str) -> dict[str, Any]:
    """Maps one default demonstration row (`prompt`, `completion`, provenance) to a schema."""
    conversation = [*messages, *_assistant(record["completion"])]
    if schema == "trl_chat":
        return {"messages": conversation} | _provenance(record)
    if schema == "openai":
        return {"messages": conversation, "cursor": record["cursor"]}
    if schema == "hh_rlhf":
        prompt = hh_transcript(messages) + "\n\nAssistant:"
        return {"prompt": prompt, "completion": " " + record["completion"]} | _provenance(record)
    return record


Render = Callable[[Any, int, Any], str]


def schema_render(kind: str, schema: str, render: Render) -> Render:
    """Wraps the default JSON Lines renderer of a kind: its units carry the prompt's messages as a last column."""
    to_schema = comparison_in_schema if kind == "comparisons" else demonstration_in_schema

    def render_in_schema(unit: Any, skip_through: int, names: Any) -> str:
        if kind == "comparisons":
            ranking, items = unit
            stored, text = ranking[-1], render((ranking[:-1], items), skip_through, names)
        else:
            stored, text = unit[-1], render(unit[:-1], skip_through, names)
        rows = []
        for line in text.splitlines():
            record = json.loads(line)
            rows.append(_encode(to_schema(record, messages_of(stored, record["prompt"]), schema)) + "\n")
        return "".join(rows)

    return render_in_schema
