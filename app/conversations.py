"""A prompt is a conversation: the one place that says what a valid one looks like.

Since ChatGPT the InstructGPT recipe runs on dialogues, so a prompt is an ordered list
of messages `{"role", "content"}` (the format TRL and OpenAI use) ending with a user
turn, which the model answers. Single-turn prompts are the one-message case, and
`prompts.text` keeps the last user message so readers that only want "the question"
still work. The shape: an optional `system` message first, then `user` and
`assistant` alternating, starting and ending with `user`; every content a non-empty
string. Import, the API, the pages, sampling and the exports all go through
`conversation_problems` / `validate_messages`, so the rule and its wording live here.
"""

from __future__ import annotations

from typing import Any

from app.errors import Invalid

ROLES = ("system", "user", "assistant")
Message = dict[str, str]
# What a model is asked to answer: a text (one user message) or a conversation ending with a user message.
PromptInput = str | list[Message]


def single_turn(text: str) -> list[Message]:
    """Returns the conversation of a one-message prompt."""
    return [{"role": "user", "content": text}]


def conversation_problems(messages: Any, field: str = "messages") -> list[tuple[str, str]]:
    """Returns every problem of a conversation as (field path, message); empty when it is valid.

    Paths name the element, e.g. `messages[2].role`, so an import can report `line 3: messages[2].role: ...`.
    """
    if not isinstance(messages, list):
        return [(field, "must be a list of messages")]
    if not messages:
        return [(field, "must hold at least one message")]
    problems: list[tuple[str, str]] = []
    roles: list[str | None] = []
    for i, message in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(message, dict):
            problems.append((where, 'must be an object with "role" and "content"'))
            roles.append(None)
            continue
        for key in message:
            if key not in ("role", "content"):
                problems.append((f"{where}.{key}", 'unknown key (allowed: "role", "content")'))
        role = message.get("role")
        if role not in ROLES:
            problems.append((f"{where}.role", f"must be one of {', '.join(ROLES)}"))
            role = None
        roles.append(role)
        content = message.get("content")
        if not isinstance(content, str):
            problems.append((f"{where}.content", "must be a string"))
        elif not content.strip():
            problems.append((f"{where}.content", "is empty"))
    if problems:
        return problems
    # Roles are all known now: check the order.
    start = 1 if roles[0] == "system" else 0
    if start == 1 and len(roles) == 1:
        return [(field, "must end with a user message")]
    for i in range(start, len(roles)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if roles[i] != expected:
            where = f"{field}[{i}].role"
            if roles[i] == "system":
                return [(where, "system may only be the first message")]
            return [(where, f"must be {expected}: after an optional system message, user and assistant alternate")]
    if roles[-1] != "user":
        return [(f"{field}[{len(roles) - 1}].role", "must be user: a conversation ends with a user message")]
    return []


def validate_messages(messages: Any, field: str = "messages") -> list[Message]:
    """Returns the conversation as plain {"role", "content"} dicts, or raises Invalid naming the first bad field."""
    problems = conversation_problems(messages, field)
    if problems:
        where, message = problems[0]
        raise Invalid(where, message)
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def last_user_text(messages: list[Message]) -> str:
    """Returns the content of the last user message: what `prompts.text` holds."""
    for message in reversed(messages):
        if message["role"] == "user":
            return message["content"]
    raise ValueError("a conversation holds at least one user message")


def messages_of(messages: list[Message] | None, text: str) -> list[Message]:
    """Returns a prompt's conversation, or the single-turn one of its text when it has none (older rows, SQL)."""
    return list(messages) if messages else single_turn(text)


def prompt_input(messages: list[Message] | None, text: str) -> PromptInput:
    """Returns what trainers get for a prompt: its text when it is a lone user message, else the conversation.

    Single-turn prompts stay plain strings, so every trainer and its data fingerprints see exactly what they
    saw before conversations existed; format_prompt renders either form.
    """
    if not messages or (len(messages) == 1 and messages[0]["role"] == "user"):
        return text
    return list(messages)


def user_turns(messages: list[Message]) -> list[str]:
    """Returns the content of every user message, in order: what prompt hygiene checks."""
    return [m["content"] for m in messages if m["role"] == "user"]
