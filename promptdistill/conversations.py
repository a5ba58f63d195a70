"""Conversations as sources give them: a row of a JSONL file in the OpenAI chat format
(`{"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}, ...]}`, the format of
OpenAI fine-tuning files and most chat logs) or in ShareGPT's (`{"conversations": [{"from": "human",
"value": ...}, {"from": "gpt", ...}, ...]}`), or the user's turns alone (`{"turns": ["...", "..."]}`:
chats to have the teacher answer, written or assembled for the purpose), checked and read into the
user's turns and the answers logged with them.

A conversation is user, assistant, user, ... in turn, and it may end on either. Its logged answers
came from another model or prompt: generate regenerates them WITH the run's prompt unless told to
keep them as context. A row's own system message would compete with the prompt being distilled, so
it is refused, as are an unknown role, two turns of one side in a row and an empty turn: each a
`ConversationError` naming the field (the caller adds file and line).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

# ShareGPT's speaker names, as its exports and the datasets built on them spell them.
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}
FORMATS = {"messages": ("role", "content", None), "conversations": ("from", "value", SHAREGPT_ROLES)}


class ConversationError(ValueError):
    """A conversation that cannot be used as it is; the message names the field."""


@dataclass(frozen=True)
class Conversation:
    turns: list[str]   # the user's turns, in order
    logged: list[str]  # the assistant answers the source gave after them (as many, or one fewer)


def conversation_field(record: dict) -> str | None:
    """The field holding a conversation ('messages', 'conversations' or 'turns'), or None for another kind of row."""
    return next((f for f in (*FORMATS, "turns") if f in record), None)


def read_conversation(record: dict) -> Conversation:
    """The record's conversation, checked; raises ConversationError naming the field at fault."""
    field = conversation_field(record)
    if field is None:
        raise ConversationError(f"no 'messages', 'conversations' or 'turns' field (fields: {sorted(record)})")
    if field == "turns":
        return Conversation(user_turns_given(record["turns"]), [])
    role_key, text_key, names = FORMATS[field]
    messages = record[field]
    if not isinstance(messages, list) or not messages:
        raise ConversationError(f"{field}: expected a non-empty list of turns")
    turns, logged = [], []
    expected = "user"
    for i, m in enumerate(messages):
        where = f"{field}[{i}]"
        if not isinstance(m, dict):
            raise ConversationError(f"{where}: expected an object with {role_key!r} and {text_key!r}")
        given = m.get(role_key)
        role = (names or {"user": "user", "assistant": "assistant", "system": "system"}).get(
            given.lower() if isinstance(given, str) else given)
        if role is None:
            known = sorted(names) if names else ["assistant", "user"]
            raise ConversationError(f"{where}.{role_key}: unknown role {given!r} (expected one of {', '.join(known)})")
        if role == "system":
            raise ConversationError(f"{where}.{role_key}: the conversation has its own system message; the run's "
                                    f"system_prompt is the one distilled (remove it from the row, or set "
                                    f"queries.bad_conversations: drop to skip such rows)")
        if role != expected:
            raise ConversationError(f"{where}.{role_key}: two {role} turns in a row (turns alternate, user first)"
                                    if i else f"{where}.{role_key}: the conversation starts with {role}; "
                                              f"it must start with the user")
        text = m.get(text_key)
        if not isinstance(text, str):
            raise ConversationError(f"{where}.{text_key}: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise ConversationError(f"{where}.{text_key}: empty turn")
        (turns if role == "user" else logged).append(text.strip())
        expected = "assistant" if role == "user" else "user"
    return Conversation(turns, logged)


def user_turns_given(turns) -> list[str]:
    """A 'turns' field: the user's turns, each a non-empty string."""
    if not isinstance(turns, list) or not turns:
        raise ConversationError("turns: expected a non-empty list of the user's turns")
    for i, text in enumerate(turns):
        if not isinstance(text, str):
            raise ConversationError(f"turns[{i}]: expected a string, got {type(text).__name__}")
        if not text.strip():
            raise ConversationError(f"turns[{i}]: empty turn")
    return [t.strip() for t in turns]


# --------------------------------------------------------------------------- a conversation row, turn by turn
# A queries.jsonl row is a conversation of one user turn ("query") or of several ("turns"); with
# "logged", the answers the source gave before its last turn, kept as the history; with
# "follow_ups" ({"n", "key"}), n more user turns a simulated user writes as it goes (follow_ups.py).


def user_turns(row: dict) -> list[str]:
    """The user turns the row gives (simulated ones are written during generate)."""
    return row.get("turns", [row["query"]])


def turn_count(row: dict) -> int:
    return len(user_turns(row)) + row.get("follow_ups", {}).get("n", 0)


def answered_turns(row: dict) -> list[int]:
    """The turns (0-based) the teacher answers: every one, or only the last after logged answers."""
    n = turn_count(row)
    return [n - 1] if "logged" in row else list(range(n))


def history(users: list[str], answers: list[str]) -> list[dict]:
    """The conversation up to and including the last of `users`, `answers` the assistant's answers
    before it (the logged ones, or the teacher's own); no system message."""
    messages = []
    for user, answer in zip(users[:-1], answers):
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": users[-1]}]


def turn_identity(row: dict, turn: int) -> str:
    """What a turn's answer depends on besides the run's settings: the query alone for a first turn
    (so a conversation's opening is the same row as that query asked alone), else every user turn
    given so far, the logged answers and, for a simulated turn, which one and the simulator's
    settings (the teacher's own earlier answers, and the simulated turns, follow from those)."""
    if turn == 0 and "logged" not in row:
        return row["query"]
    given = user_turns(row)
    if turn < len(given):
        return json.dumps({"turns": given[:turn + 1], "logged": row.get("logged", [])[:turn]}, ensure_ascii=False)
    return json.dumps({"turns": given, "follow_up": turn, "simulator": row["follow_ups"]["key"]}, ensure_ascii=False)


def turn_id(row: dict, turn: int) -> str:
    """A turn's row id in teacher.jsonl: the conversation's id, then '#' and the turn's number past the first."""
    return row["id"] if turn == 0 else f"{row['id']}#{turn + 1}"
