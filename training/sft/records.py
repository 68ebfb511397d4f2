"""The canonical SFT records of seed 004 and their conversion into one conversation shape.

Three stages, four record shapes (one JSON object per line):

- instruct: ``{"instruction", "output"}`` or ``{"messages": [{"role", "content"}, ...]}``;
- tool: ``{"user_message", "tool_calls": [{"name", "arguments"}], "tool_results": [{"content"}],
  "assistant_response"}`` (optionally ``"system"``: the function definitions the model may call);
- reasoning: ``{"question", "reasoning", "answer"}``.

Every shape becomes a list of messages whose roles are those of the chat template
(:data:`ROLES`); the template and the loss mask then treat all stages alike. A record that does
not fit its shape raises :class:`RecordError` with a short reason, which the callers count and
report by source and row instead of crashing.
"""

from __future__ import annotations

import json
from typing import Any

STAGES = ("instruct", "tool", "reasoning")
ROLES = ("system", "user", "assistant", "tool_call", "tool_result", "reasoning")
# What the model must produce itself: these messages are trained on, the others are context.
OUTPUT_ROLES = frozenset({"assistant", "tool_call", "reasoning"})
STAGE_FILES = {stage: f"{stage}_data.jsonl" for stage in STAGES}

Message = dict[str, str]


class RecordError(ValueError):
    """A record does not have its canonical shape; the message says which key is wrong."""


def _text(record: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise RecordError(f"{key}: expected a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise RecordError(f"{key}: empty")
    return value


def record_kind(record: Any) -> str:
    """``"instruction"``, ``"messages"``, ``"tool"`` or ``"reasoning"``: which shape ``record`` claims."""
    if not isinstance(record, dict):
        raise RecordError(f"expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return "messages"
    if "instruction" in record:
        return "instruction"
    if "user_message" in record:
        return "tool"
    if "question" in record:
        return "reasoning"
    raise RecordError(f"no canonical keys (messages, instruction, user_message or question) among {sorted(record)[:6]}")


STAGE_OF_KIND = {"instruction": "instruct", "messages": "instruct", "tool": "tool", "reasoning": "reasoning"}


def tool_call_text(call: Any) -> str:
    """One tool call as the text the model writes: compact JSON, keys in a fixed order."""
    if not isinstance(call, dict) or not isinstance(call.get("name"), str) or not call["name"]:
        raise RecordError("tool_calls: each call needs a non-empty name")
    arguments = call.get("arguments", {})
    if not isinstance(arguments, (dict, list, str, int, float, bool)) and arguments is not None:
        raise RecordError(f"tool_calls: arguments of {call['name']} is {type(arguments).__name__}")
    return json.dumps({"name": call["name"], "arguments": arguments}, ensure_ascii=False)


def to_messages(record: Any) -> list[Message]:
    """The conversation a canonical record stands for; raises :class:`RecordError` if malformed."""
    kind = record_kind(record)
    messages: list[Message] = []
    if isinstance(record.get("system"), str) and record["system"].strip():
        messages.append({"role": "system", "content": record["system"]})
    if kind == "instruction":
        messages += [{"role": "user", "content": _text(record, "instruction")},
                     {"role": "assistant", "content": _text(record, "output")}]
    elif kind == "messages":
        items = record["messages"]
        if not isinstance(items, list) or not items:
            raise RecordError("messages: expected a non-empty list")
        for i, item in enumerate(items):
            if not isinstance(item, dict) or item.get("role") not in ROLES:
                role = item.get("role") if isinstance(item, dict) else item
                raise RecordError(f"messages[{i}].role: {role!r} is not one of {', '.join(ROLES)}")
            messages.append({"role": item["role"], "content": _text(item, "content", allow_empty=item["role"] != "assistant")})
    elif kind == "tool":
        calls, results = record.get("tool_calls", []), record.get("tool_results", [])
        if not isinstance(calls, list) or not isinstance(results, list):
            raise RecordError("tool_calls and tool_results: expected lists")
        messages.append({"role": "user", "content": _text(record, "user_message")})
        messages += [{"role": "tool_call", "content": tool_call_text(call)} for call in calls]
        for result in results:
            if not isinstance(result, dict) or not isinstance(result.get("content"), str):
                raise RecordError("tool_results: each result needs a string content")
            messages.append({"role": "tool_result", "content": result["content"]})
        messages.append({"role": "assistant", "content": _text(record, "assistant_response")})
    else:
        messages += [{"role": "user", "content": _text(record, "question")},
                     {"role": "reasoning", "content": _text(record, "reasoning")},
                     {"role": "assistant", "content": _text(record, "answer")}]
    if not any(m["role"] in OUTPUT_ROLES and m["content"] for m in messages):
        raise RecordError("no assistant output to train on")
    return messages
