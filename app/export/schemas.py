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

- `kto` (rankings export): TRL's conversational unpaired preference rows, one per ranked output the rule below
  labels: `prompt` (the conversation), `completion` (a one-message assistant list), boolean `label`, provenance.
  The rule, per ranking (ranks: 1 = best, equal ranks tie; Likert 1-7): an output is undesirable (`false`) when
  the ranking was marked all unacceptable, or its Likert is at most 3, or it is in the worst rank group of a
  ranking with at least two groups and its Likert is at most 4; desirable (`true`) when it is in the best rank
  group and its Likert is at least 5; every other output is left out (ranked in the middle, or best with a
  neutral Likert, or worst while rated good). Each ranking gives each of its outputs at most once, so an output
  ranked by three labelers gives up to three rows, one per labeler; `cursor` is `<ranking_id>:<row index>`.
- `kway` (rankings export): the lossless row, one per ranking: `messages` (the conversation) in place of the
  prompt's text, and every output with its rank, Likert, flags, display position, model version and `author`
  (`model` or `human`), beside the labeler, batch, split and the rest of the rankings row.

A comparisons export can carry a `margin` per pair: `rank` gives rejected_rank - chosen_rank (1 or more),
`likert` gives chosen_likert - rejected_likert (from -6 to 6: zero or negative when the Likert scores disagree
with the ranking; such pairs are kept, so rows and cursors still match the export without a margin).

These schemas nest lists, so they are JSON Lines only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from app.conversations import Message, messages_of

SCHEMAS = ("trl", "trl_chat", "openai", "hh_rlhf", "kto", "kway")
SCHEMA_KINDS = ("comparisons", "demonstrations")
RANKING_SCHEMAS = ("kto", "kway")
MARGINS = ("rank", "likert")
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_TEXT_FIELDS = ("prompt", "chosen", "rejected", "completion")


def schema_problem(kind: str, fmt: str, schema: str) -> str | None:
    """Says why an export cannot be given in this schema, or None when it can."""
    if schema not in SCHEMAS:
        return f"must be one of {', '.join(SCHEMAS)}"
    if schema == "trl":
        return None
    if schema in RANKING_SCHEMAS:
        if kind != "rankings":
            return f"{schema} applies to the rankings export (it needs every output of a ranking)"
    elif kind not in SCHEMA_KINDS:
        return f"{schema} applies to the comparisons and demonstrations exports; rankings are exported as they are"
    if fmt != "jsonl":
        return f"{schema} rows hold lists of messages, so they are JSON Lines only (format=jsonl)"
    return None


def margin_problem(kind: str, fmt: str, margin: str | None) -> str | None:
    """Says why an export cannot carry this margin, or None when it can (or there is none)."""
    if margin is None:
        return None
    if margin not in MARGINS:
        return f"must be one of {', '.join(MARGINS)}"
    if kind != "comparisons":
        return "applies to the comparisons export (a margin is between the two outputs of a pair)"
    if fmt != "jsonl":
        return "is given in JSON Lines only (format=jsonl)"
    return None


def pair_margin(record: dict[str, Any], margin: str) -> int:
    """The margin of a default comparison row: rank distance or Likert difference (see the module's note)."""
    if margin == "rank":
        return int(record["rejected_rank"] - record["chosen_rank"])
    return int(record["chosen_likert"] - record["rejected_likert"])


def kto_label(rank: int, likert: int, best: int, worst: int, all_unacceptable: bool) -> bool | None:
    """The KTO label of one ranked output, or None when it is left out (the rule is in the module's note)."""
    if all_unacceptable or likert <= 3:
        return False
    if rank == best and likert >= 5:
        return True
    if rank == worst and worst != best and likert <= 4:
        return False
    return None


_KTO_KEPT: tuple[str, ...] = ("ranking_id", "prompt_id", "task_id", "all_unacceptable", "is_gold", "batch")
_KTO_KEPT += ("batch_id", "split", "labeler", "labeler_held_out", "submitted_at")


def ranking_in_kto(record: dict[str, Any], messages: list[Message], skip_through: int = -1) -> list[dict[str, Any]]:
    """Maps one rankings row to its KTO rows, leaving out rows up to index `skip_through` (a resumed export)."""
    outputs = record["completions"]
    if not outputs:
        return []
    ranks = [output["rank"] for output in outputs]
    best, worst, unacceptable = min(ranks), max(ranks), record["all_unacceptable"]
    rows: list[dict[str, Any]] = []
    for output in outputs:
        label = kto_label(output["rank"], output["likert"], best, worst, unacceptable)
        if label is None:
            continue
        n = len(rows)
        rows.append(
            {"prompt": messages, "completion": _assistant(output["text"]), "label": label}
            | {key: output[key] for key in ("completion_id", "rank", "likert", "flags", "model_version")}
            | {key: record[key] for key in _KTO_KEPT}
            | {"cursor": f"{record['ranking_id']}:{n}"}
        )
    return rows[skip_through + 1 :]


def ranking_in_kway(record: dict[str, Any], messages: list[Message]) -> dict[str, Any]:
    """Maps one rankings row to the lossless `kway` row: the conversation and every output, nothing dropped."""
    outputs = [
        output | {"author": "human" if output["model_version"] is None else "model"} for output in record["completions"]
    ]
    head = {"ranking_id": record["ranking_id"], "prompt_id": record["prompt_id"], "task_id": record["task_id"]}
    rest = {key: value for key, value in record.items() if key not in head and key not in ("prompt", "completions")}
    return head | {"messages": messages, "k": record["k"], "completions": outputs} | rest


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


def schema_render(kind: str, schema: str, render: Render, margin: str | None = None) -> Render:
    """Wraps the default JSON Lines renderer of a kind: its units carry the prompt's messages as a last column.

    With schema `trl` (only a margin to add) the units have no messages column.
    """
    to_schema = comparison_in_schema if kind == "comparisons" else demonstration_in_schema
    with_messages = schema != "trl"

    def render_in_schema(unit: Any, skip_through: int, names: Any) -> str:
        stored = None
        if kind in ("comparisons", "rankings"):
            ranking, items = unit
            if with_messages:
                stored, ranking = ranking[-1], ranking[:-1]
            # A KTO cursor counts its own rows, so the rankings row is rendered whole and cut below.
            text = render((ranking, items), -1 if kind == "rankings" else skip_through, names)
        else:
            if with_messages:
                stored, unit = unit[-1], unit[:-1]
            text = render(unit, skip_through, names)
        rows: list[str] = []
        for line in text.splitlines():
            record = json.loads(line)
            messages = messages_of(stored, record["prompt"])
            if schema == "kto":
                rows.extend(_encode(row) + "\n" for row in ranking_in_kto(record, messages, skip_through))
                continue
            if schema == "kway":
                rows.append(_encode(ranking_in_kway(record, messages)) + "\n")
                continue
            extra = {} if margin is None else {"margin": pair_margin(record, margin)}
            rows.append(_encode(to_schema(record, messages, schema) | extra) + "\n")
        return "".join(rows)

    return render_in_schema
