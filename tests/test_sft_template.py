"""The chat template, the loss mask and packing: ids equal transformers' ``apply_chat_template``;
only assistant output is trained on; a packed batch computes what its examples compute alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sft_support import BASE_VOCAB, make_chat_bundle, tiny_model_config
from training.config import ModelConfig
from training.model import Transformer
from training.sft.loader import SFTLoader, tokenize_records
from training.sft.records import to_messages
from training.sft.template import CHAT_TOKENS, END_TOKEN, ChatTokenizer, TemplateError, label_array, render, write_chat_bundle

RECORDS = [
    {"instruction": "Give three tips for staying healthy.", "output": "Eat well, sleep, move. ✓"},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                  {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}]},
    {"system": "functions: get_rate", "user_message": "USD to EUR?", "tool_calls": [{"name": "get_rate", "arguments": {"base": "USD"}}],
     "tool_results": [{"content": "{\"rate\": 0.85}"}], "assistant_response": "It is 0.85."},
    {"question": "What is 17 * 3?", "reasoning": "17 * 3 = 51", "answer": "51"},
]


@pytest.fixture(scope="module")
def chat(tmp_path_factory: pytest.TempPathFactory) -> ChatTokenizer:
    return make_chat_bundle(tmp_path_factory.mktemp("chat"))


def test_chat_tokens_have_fixed_ids_and_transformers_gives_the_same_ids(chat: ChatTokenizer) -> None:
    from transformers import PreTrainedTokenizerFast

    assert [chat.ids[t] for t in CHAT_TOKENS] == list(range(BASE_VOCAB, BASE_VOCAB + len(CHAT_TOKENS)))
    hf = PreTrainedTokenizerFast.from_pretrained(str(chat.directory))
    for record in RECORDS:
        messages = to_messages(record)
        for gen in (False, True):
            ours, _ = chat.encode(messages, add_generation_prompt=gen)
            theirs = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
            assert ours == list(theirs), record
            assert hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=False) == render(messages, gen)
    assert hf.eos_token == END_TOKEN


def test_chat_bundle_is_reused_and_refuses_a_chat_bundle_as_base(chat: ChatTokenizer, tmp_path: Path) -> None:
    again = write_chat_bundle(chat.directory.parent / "base", chat.directory)
    assert again.ids == chat.ids
    with pytest.raises(TemplateError, match="already holds chat tokens"):
        write_chat_bundle(chat.directory, tmp_path / "twice")


def test_only_assistant_output_is_a_target(chat: ChatTokenizer) -> None:
    ids, mask = chat.encode(to_messages(RECORDS[2]))
    x, y = label_array(ids, mask)
    text = chat.tokenizer.decode([int(t) for t in y[y != -100]], skip_special_tokens=False)
    assert text == ('<|tool_call|>{"name": "get_rate", "arguments": {"base": "USD"}}<|end|>'
                    "<|assistant|>It is 0.85.<|end|>")


def _loss(model: Transformer, chat: ChatTokenizer, record: dict) -> torch.Tensor:
    ex = tokenize_records([json.dumps(record)], chat, 256, "test")
    x, y, doc = SFTLoader(ex, 1, 200, "packed", 0, shuffle=False).next_batch()
    return model(x, y, doc_ids=doc)[1]


def test_masking_prompt_and_tool_results_do_not_change_the_loss_one_assistant_token_does(chat: ChatTokenizer) -> None:
    """Messages after the last output message cannot influence any prediction through attention
    (causal), so the loss moves only if their own tokens were wrongly counted as targets."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**tiny_model_config(chat.vocab_size))).eval()
    base = {"messages": [{"role": "user", "content": "Weather in Paris?"},
                         {"role": "tool_call", "content": '{"name": "weather", "arguments": {"city": "Paris"}}'},
                         {"role": "tool_result", "content": "sunny, 21 C"},
                         {"role": "user", "content": "and tomorrow?"}]}
    with torch.no_grad():
        reference = float(_loss(model, chat, base))
        for index, text in ((2, "rain, 9 C and wind"), (3, "what about Lyon next week?")):
            changed = json.loads(json.dumps(base))
            changed["messages"][index]["content"] = text
            assert abs(float(_loss(model, chat, changed)) - reference) < 1e-6, index  # row shape changes: float noise only
        one = json.loads(json.dumps(base))
        one["messages"][1]["content"] = one["messages"][1]["content"].replace("Paris", "Paria")
        assert abs(float(_loss(model, chat, one)) - reference) > 1e-3
    # the prompt before the call changes the context of the call, so there the mask itself is checked
    first = len(chat.encode(to_messages({"messages": base["messages"][:1] + [base["messages"][1]]}))[0]) - \
        len(chat.encode([base["messages"][1]])[0])
    _, mask = chat.encode(to_messages(base))
    assert first > 3 and not any(mask[:first]) and all(mask[first:first + 3])


@pytest.mark.parametrize("packing", ["packed", "padded"])
def test_a_batch_loss_equals_the_examples_run_one_by_one(chat: ChatTokenizer, packing: str) -> None:
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**tiny_model_config(chat.vocab_size))).eval()
    lines = [json.dumps(r) for r in RECORDS]
    ex = tokenize_records(lines, chat, 256, "test")
    rows = 1 if packing == "packed" else len(RECORDS)
    width = int((np.diff(ex.offsets) - 1).sum()) + 2  # all four fit in one row, a fifth does not
    x, y, doc = SFTLoader(ex, rows, width, packing, 0, shuffle=False).next_batch()
    if packing == "packed":
        assert x.shape[0] == 1 and int(doc.max()) == len(RECORDS)  # all four in one row, then the padding block
    with torch.no_grad():
        batch = model(x, y) if doc is None else model(x, y, doc_ids=doc)
        total, count = 0.0, 0
        for i in range(len(RECORDS)):
            tokens, mask = ex.example(i)
            xi, yi = label_array(tokens.tolist(), mask.tolist())
            n = int((yi != -100).sum())
            total += float(model(torch.from_numpy(xi)[None], torch.from_numpy(yi)[None])[1]) * n
            count += n
    assert abs(float(batch[1]) - total / count) < 1e-5


def test_loader_resumes_exactly_and_ranks_split_the_global_batch(chat: ChatTokenizer) -> None:
    lines = [json.dumps({"instruction": f"say {i}", "output": "x" * (i % 7 + 1)}) for i in range(40)]
    ex = tokenize_records(lines, chat, 64, "test")
    for packing in ("packed", "padded"):
        a = SFTLoader(ex, 2, 48, packing, 3)
        for _ in range(5):
            a.next_batch()
        state = a.state_dict()
        expected = [a.next_batch() for _ in range(30)]  # crosses epochs
        b = SFTLoader(ex, 2, 48, packing, 3)
        b.load_state_dict(state)
        for want, got in zip(expected, (b.next_batch() for _ in range(30))):
            assert all((w is None and g is None) or torch.equal(w, g) for w, g in zip(want, got))
        whole = SFTLoader(ex, 4, 48, packing, 3).next_batch()
        parts = [SFTLoader(ex, 2, 48, packing, 3, rank=r, world_size=2).next_batch() for r in (0, 1)]
        assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])
    assert np.all(np.diff(ex.offsets) > 0)
