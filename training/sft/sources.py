"""Seed 004's fine-tuning sources and the converter from each one's own schema to canonical records.

A source is a hub dataset id (with its configs and split) and a function from one of its rows to a
canonical record (training/sft/records.py). Rows are read with ``datasets.load_dataset`` whether
the source is the hub id or local files standing in for it (``json``/``parquet`` builders on
``data_files``): the same call path, so an offline test on a few rows in the real schema exercises
exactly what a pod runs. A row that does not convert raises :class:`RecordError`; the caller counts
it under the source and row number.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from training.hub import unreachable_reason
from training.jsonl import describe_bad_line
from training.sft.records import RecordError, tool_call_text

Row = dict[str, Any]


def _str(row: Row, key: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"{key}: missing or empty")
    return value.strip()


def alpaca(row: Row) -> dict[str, Any]:
    """yahma/alpaca-cleaned: instruction, input (often empty), output; the input follows the instruction."""
    instruction = _str(row, "instruction")
    extra = (row.get("input") or "").strip()
    return {"instruction": f"{instruction}\n\n{extra}" if extra else instruction, "output": _str(row, "output")}


_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "chatgpt": "assistant", "bard": "assistant",
                   "assistant": "assistant", "system": "system"}


def sharegpt(row: Row) -> dict[str, Any]:
    """zetavg/ShareGPT-Processed: conversations [{from, value, markdown, ...}]; ``value`` is the plain text."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise RecordError("conversations: missing or empty")
    messages = []
    for i, turn in enumerate(turns):
        role = _SHAREGPT_ROLES.get(str((turn or {}).get("from", "")).lower())
        if role is None:
            raise RecordError(f"conversations[{i}].from: unknown speaker {(turn or {}).get('from')!r}")
        messages.append({"role": role, "content": _str(turn, "value")})
    if not any(m["role"] == "assistant" for m in messages):
        raise RecordError("conversations: no gpt turn")
    return {"messages": messages}


def ultrachat(row: Row) -> dict[str, Any]:
    """HuggingFaceH4/ultrachat_200k: messages [{content, role}] already in chat form (prompt/prompt_id dropped)."""
    items = row.get("messages")
    if not isinstance(items, list) or not items:
        raise RecordError("messages: missing or empty")
    messages = []
    for i, item in enumerate(items):
        if (item or {}).get("role") not in ("system", "user", "assistant"):
            raise RecordError(f"messages[{i}].role: {(item or {}).get('role')!r}")
        messages.append({"role": item["role"], "content": _str(item, "content")})
    return {"messages": messages}


_GLAIVE_TURN = re.compile(r"(USER|ASSISTANT|FUNCTION RESPONSE):")
_GLAIVE_CALL = re.compile(r"<functioncall>\s*(.*?)\s*(?:<\|endoftext\|>)?\s*$", re.S)


def _glaive_call(text: str) -> dict[str, Any]:
    """``{"name": "f", "arguments": '{"a": 1}'}``: glaive quotes the arguments object in single quotes."""
    body = _GLAIVE_CALL.search(text)
    if body is None:
        raise RecordError("chat: <functioncall> without a call")
    raw = body.group(1).replace("'{", "{").replace("}'", "}")
    try:
        call = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RecordError(f"chat: function call is not JSON ({exc.msg})") from None
    if isinstance(call.get("arguments"), str):
        try:
            call["arguments"] = json.loads(call["arguments"])
        except json.JSONDecodeError:
            raise RecordError("chat: function call arguments are not JSON") from None
    tool_call_text(call)  # validates name/arguments
    return {"name": call["name"], "arguments": call.get("arguments", {})}


def glaive(row: Row) -> dict[str, Any]:
    """glaiveai/glaive-function-calling-v2: ``system`` (``SYSTEM: ...`` + function specs) and ``chat``, one
    string of ``USER:``/``ASSISTANT:``/``FUNCTION RESPONSE:`` turns, calls as ``<functioncall> {...}``.

    The canonical tool record holds one exchange: the first user message, the calls and results that
    answer it, and the first plain assistant reply after them; later turns are not kept.
    """
    chat = _str(row, "chat")
    parts = _GLAIVE_TURN.split(chat)
    turns = [(parts[i], parts[i + 1].replace("<|endoftext|>", "").strip()) for i in range(1, len(parts) - 1, 2)]
    if not turns or turns[0][0] != "USER":
        raise RecordError("chat: does not start with a USER: turn")
    record: dict[str, Any] = {"user_message": turns[0][1], "tool_calls": [], "tool_results": [], "assistant_response": None}
    for speaker, text in turns[1:]:
        if speaker == "USER":
            break
        if speaker == "FUNCTION RESPONSE":
            record["tool_results"].append({"content": text})
        elif "<functioncall>" in text:
            record["tool_calls"].append(_glaive_call(text))
        else:
            record["assistant_response"] = text
            break
    if not record["user_message"]:
        raise RecordError("chat: empty USER turn")
    if not record["assistant_response"]:
        raise RecordError("chat: no ASSISTANT reply after the first USER turn")
    system = (row.get("system") or "").strip()
    system = system[len("SYSTEM:"):].strip() if system.startswith("SYSTEM:") else system
    return {**({"system": system} if system else {}), **record}


_CALCULATOR = re.compile(r"<<[^>]*>>")


def gsm8k(row: Row) -> dict[str, Any]:
    """gsm8k (config main): question, answer = worked steps, then ``#### <final answer>``.
    The calculator annotations ``<<48/2=24>>`` are tool traces, not reasoning text: removed."""
    question, answer = _str(row, "question"), _str(row, "answer")
    steps, sep, final = answer.rpartition("####")
    if not sep or not final.strip() or not steps.strip():
        raise RecordError("answer: no '#### <answer>' line after the steps")
    return {"question": question, "reasoning": _CALCULATOR.sub("", steps).strip(), "answer": final.strip()}


def aqua_rat(row: Row) -> dict[str, Any]:
    """aqua_rat (config raw): question, options ['A)21', ...], rationale, correct ('A'); the options are
    part of the question and the answer is the correct option as written."""
    question, rationale, correct = _str(row, "question"), _str(row, "rationale"), _str(row, "correct")
    options = row.get("options")
    if not isinstance(options, list) or not options:
        raise RecordError("options: missing or empty")
    chosen = [o for o in options if isinstance(o, str) and o.strip().upper().startswith(correct.upper())]
    if not chosen:
        raise RecordError(f"correct: {correct!r} is none of the options")
    return {"question": question + "\n" + "\n".join(str(o) for o in options), "reasoning": rationale, "answer": chosen[0].strip()}


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces matched), MATH's convention for the final answer."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1 : j].strip()
    return None


def hendrycks_math(row: Row) -> dict[str, Any]:
    """EleutherAI/hendrycks_math (one config per subject): problem, level, type, solution; the answer is
    the solution's last ``\\boxed{}``."""
    problem, solution = _str(row, "problem"), _str(row, "solution")
    answer = last_boxed(solution)
    if not answer:
        raise RecordError("solution: no \\boxed{} answer")
    return {"question": problem, "reasoning": solution, "answer": answer}


MATH_SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra", "number_theory",
                 "prealgebra", "precalculus")


@dataclass(frozen=True)
class Source:
    """A hub dataset and how its rows become canonical records."""

    name: str  # the hub id, also the name used by --source NAME=PATH and in reports
    stage: str
    convert: Callable[[Row], dict[str, Any]]
    configs: tuple[str | None, ...] = (None,)
    split: str = "train"
    aliases: tuple[str, ...] = field(default_factory=tuple)


SOURCES: tuple[Source, ...] = (
    Source("yahma/alpaca-cleaned", "instruct", alpaca, aliases=("alpaca-cleaned", "alpaca")),
    Source("zetavg/ShareGPT-Processed", "instruct", sharegpt, aliases=("ShareGPT-Processed", "sharegpt")),
    Source("HuggingFaceH4/ultrachat_200k", "instruct", ultrachat, split="train_sft", aliases=("ultrachat_200k", "ultrachat")),
    Source("glaiveai/glaive-function-calling-v2", "tool", glaive, aliases=("glaive-function-calling-v2", "glaive")),
    Source("gsm8k", "reasoning", gsm8k, configs=("main",), aliases=("openai/gsm8k",)),
    Source("aqua_rat", "reasoning", aqua_rat, configs=("raw",), aliases=("deepmind/aqua_rat",)),
    Source("EleutherAI/hendrycks_math", "reasoning", hendrycks_math, configs=MATH_SUBJECTS, aliases=("hendrycks_math",)),
)


def find_source(name: str) -> Source:
    for source in SOURCES:
        if name == source.name or name in source.aliases:
            return source
    raise KeyError(find_source_error(name))


def find_source_error(name: str) -> str:
    return f"{name!r} is not a seed-004 source (known: {', '.join(s.name for s in SOURCES)})"


def _local_builder(path: Path) -> str:
    suffixes = "".join(path.suffixes[-2:]).lower()
    if suffixes.endswith((".parquet",)):
        return "parquet"
    if suffixes.endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
        return "json"
    raise ValueError(f"{path}: expected .jsonl, .json or .parquet")


def _load_local(path: Path, cache_dir: str | None):
    """A local stand-in read with the hub's call; a file `datasets` cannot parse is one line naming it
    (``file:line`` for broken JSON Lines) instead of its DatasetGenerationError traceback."""
    from datasets import load_dataset
    from datasets.utils import logging as datasets_logging

    builder = _local_builder(path)
    verbosity, bars = datasets_logging.get_verbosity(), datasets_logging.is_progress_bar_enabled()
    datasets_logging.set_verbosity(datasets_logging.CRITICAL)  # its own "Failed to load JSON" log line and bar would precede ours
    datasets_logging.disable_progress_bar()
    try:
        return load_dataset(builder, data_files=str(path), split="train", cache_dir=cache_dir)
    except Exception as exc:  # datasets wraps the parser's error in DatasetGenerationError
        located = describe_bad_line([path]) if builder == "json" else None
        cause = exc.__cause__ or exc
        raise ValueError(located or f"{path}: cannot read ({' '.join(str(cause).split())[:200]})") from None
    finally:
        datasets_logging.set_verbosity(verbosity)
        if bars:
            datasets_logging.enable_progress_bar()


def iter_rows(source: Source, local: dict[str | None, str] | None = None, limit: int | None = None,
              cache_dir: str | None = None) -> Iterator[tuple[str, int, Row]]:
    """(label, row number, row) of every config of ``source``, up to ``limit`` rows per config.

    ``local`` maps a config (None for a single-config source) to a local file read with the same
    ``load_dataset`` call; without it the hub id is loaded (network, or the HF cache offline).
    """
    from datasets import load_dataset

    for config in source.configs:
        label = source.name + (f"/{config}" if config and len(source.configs) > 1 else "")
        if local is not None:
            path = local.get(config) or (local.get(None) if len(source.configs) == 1 else None)
            if path is None:
                continue
            dataset = _load_local(Path(path), cache_dir)
        else:
            if (reason := unreachable_reason()) is not None:
                raise ValueError(f"{source.name}: cannot reach the Hugging Face Hub: {reason}")
            dataset = load_dataset(source.name, config, split=source.split, cache_dir=cache_dir)
        if limit is not None:
            dataset = dataset.select(range(min(limit, len(dataset))))
        for i, row in enumerate(dataset):
            yield label, i, row
