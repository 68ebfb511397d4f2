"""Bad data input (issue 25): the sharder, recipes, curate settings and the tokenizer choice. Each case
is one line naming the file, key or flag; orchestrate refuses what a later stage would refuse when it
plans the run, before any work (no ``datasets`` folder is created). Helpers: tests/test_bad_inputs.py."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from test_bad_inputs import ENV, one_line, orchestrate


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def recipe(tmp_path: Path, data: dict) -> Path:
    return write(tmp_path / "recipe.yaml", yaml.safe_dump({"data": data}))


def sharder(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sharder", "--mode", "prod", "--workspace", str(tmp_path / "ws"),
                           "--experiment", "e", *args], env=ENV, capture_output=True, text=True, timeout=120)


# 4. a repeated name in --dataset-limit ---------------------------------------------------------------
def test_repeated_dataset_limit_name_is_refused(tmp_path) -> None:
    docs = write(tmp_path / "a.txt", "one document\nanother document\n")
    data = recipe(tmp_path, {"sources": [{"type": "files", "path": str(docs), "name": "alpha"}]})
    result = orchestrate("--data", str(data), "--dataset-limit", "alpha=5,alpha=7", "--workspace", str(tmp_path / "ws"))
    assert result.exit_code == 2
    assert one_line(result.stderr) == ("orchestrate: error: --dataset-limit 'alpha=5,alpha=7': alpha is given twice; "
                                       "give each source once")
    assert not (tmp_path / "ws" / "datasets").exists()


# 11. malformed JSON Lines: file:line, 1-based ----------------------------------------------------------
@pytest.mark.parametrize("lines, bad_line", [(3000, 3000), (3, 2)])
def test_malformed_jsonl_names_file_and_line(tmp_path, lines, bad_line) -> None:
    rows = [json.dumps({"text": f"document number {i} " * 5}) for i in range(1, lines + 1)]
    rows[bad_line - 1] = '{"text": "broken'
    path = write(tmp_path / "in.jsonl", "\n".join(rows) + "\n")
    proc = sharder(tmp_path, "--input", str(path))
    assert proc.returncode == 2
    assert one_line(proc.stderr) == f"error: --input {path}:{bad_line}: not valid JSON (Unterminated string starting at column 10)"


def test_a_json_document_over_several_lines_is_not_called_broken(tmp_path) -> None:
    from training.jsonl import first_bad_line

    path = write(tmp_path / "doc.json", json.dumps([{"text": "a"}, {"text": "b"}], indent=2))
    assert first_bad_line(path) is None
    assert first_bad_line(write(tmp_path / "lines.jsonl", '{"text": "a"}\n\n{"text": \n')) == (3, "Expecting value at column 10")


# 16. a recipe source whose glob matches nothing: the recipe and the source, checked before any work ----
def test_recipe_glob_matching_nothing_names_recipe_and_source(tmp_path) -> None:
    pattern = str(tmp_path / "nothing-*.jsonl")
    data = recipe(tmp_path, {"sources": [{"type": "files", "path": pattern, "name": "web"}]})
    result = orchestrate("--data", str(data), "--workspace", str(tmp_path / "ws"), "--experiment", "e")
    assert result.exit_code == 2
    assert one_line(result.stderr) == f"orchestrate: error: --data {data}: source web: path {pattern}: matches no file"
    assert not (tmp_path / "ws" / "datasets").exists()


# 16. a corrupt PDF: our line only, no pypdf log line before it -----------------------------------------
def test_corrupt_pdf_is_one_line(tmp_path) -> None:
    pdf = write(tmp_path / "pdfs" / "broken.pdf", "%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n")
    data = recipe(tmp_path, {"sources": [{"type": "pdf", "path": str(pdf.parent), "name": "docs"}]})
    proc = sharder(tmp_path, "--data", str(data))
    assert proc.returncode == 2
    assert one_line(proc.stderr).startswith(f"error: pdf source {pdf}: cannot read: ")


# 12. curate settings and the tokenizer choice, refused when orchestrate plans -------------------------
@pytest.fixture
def text_source(tmp_path) -> Path:
    return write(tmp_path / "docs.txt", "".join(f"document {i} with some words in it\n" for i in range(50)))


@pytest.mark.parametrize("curate, message", [
    ({"quality": {"gopher_quality": {"min_doc_wordz": 5}}},
     "data.curate.quality.gopher_quality.min_doc_wordz: unknown option (options: "),
    ({"perplexity": {"checkpoint": "{tmp}/nowhere", "tokenizer": "{tmp}/tok.json", "max_perplexity": 100}},
     "data.curate.perplexity.checkpoint {tmp}/nowhere: no final.safetensors there"),
])
def test_bad_curate_settings_are_refused_before_any_work(tmp_path, text_source, curate, message) -> None:
    curate = json.loads(json.dumps(curate).replace("{tmp}", str(tmp_path)))
    data = recipe(tmp_path, {"sources": [{"type": "files", "path": str(text_source), "name": "docs"}], "curate": curate})
    result = orchestrate("--data", str(data), "--workspace", str(tmp_path / "ws"), "--experiment", "e")
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith(f"orchestrate: error: --data {data}: {message.format(tmp=tmp_path)}")
    assert not (tmp_path / "ws" / "datasets").exists()


def test_non_finite_recipe_number_is_refused(tmp_path, text_source) -> None:
    from sharder.errors import ShardError
    from sharder.recipe import load_recipe

    data = recipe(tmp_path, {"sources": [{"type": "files", "path": str(text_source)}], "curate": {"perplexity": {
        "checkpoint": str(tmp_path), "tokenizer": str(text_source), "max_perplexity": float("inf")}}})
    with pytest.raises(ShardError, match=r"data.curate.perplexity.max_perplexity: Input should be a finite number"):
        load_recipe(data)


def test_missing_tokenizer_json_is_refused_before_any_work(tmp_path, text_source) -> None:
    missing = tmp_path / "nowhere" / "tokenizer.json"
    result = orchestrate("--input", str(text_source), "--tokenizer-json", str(missing), "--workspace", str(tmp_path / "ws"),
                         "--experiment", "e")
    assert result.exit_code == 2
    assert one_line(result.stderr).startswith(f"orchestrate: error: --tokenizer-json {missing}: no such file")
    assert not (tmp_path / "ws" / "datasets").exists()


def test_tokenizer_json_larger_than_the_model_vocabulary_is_refused_before_any_work(tmp_path, text_source) -> None:
    from conftest import write_byte_tokenizer

    tokenizer = write_byte_tokenizer(tmp_path / "tok")  # 257 ids
    named = tokenizer / "tokenizer.json" if tokenizer.is_dir() else tokenizer
    config = write(tmp_path / "small.yaml", (Path(__file__).resolve().parents[1] / "configs" / "demo.yaml").read_text())
    result = orchestrate("--input", str(text_source), "--tokenizer-json", str(tokenizer), "--config", str(config),
                         "--workspace", str(tmp_path / "ws"), "--experiment", "e", "model.vocab_size=256")
    assert result.exit_code == 2
    assert one_line(result.stderr) == (f"orchestrate: error: --tokenizer-json {named}: tokenizer has 257 ids, more than "
                                       f"vocab_size=256 (model.vocab_size of {config})")
    assert not (tmp_path / "ws" / "datasets").exists()

# A proxy in the caller's environment (CI may set one) would make the hub check stand aside.
PROXY_KEYS = [k for name in ("http_proxy", "https_proxy", "all_proxy", "no_proxy") for k in (name, name.upper())]


# 9. a hub dataset when the hub's host does not resolve: one line at once, no retry lines -----------------
def test_unresolvable_hub_is_one_line_without_retries(tmp_path) -> None:
    env = {**ENV, "HF_ENDPOINT": "http://nonexistent.invalid", "HF_HOME": str(tmp_path / "hf")}
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", *PROXY_KEYS):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "--input", "hf:nosuch/thing", "--experiment", "e",
                           "--workspace", str(tmp_path / "ws")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert one_line(proc.stderr) == ("orchestrate: error: stage shard failed: --input hf:nosuch/thing: cannot reach the "
                                     "Hugging Face Hub: nonexistent.invalid does not resolve (Name or service not known); "
                                     "is the network up? (HF_HUB_OFFLINE=1 reads the local cache only)")



def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on: bound by us, then released."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_hub_that_refuses_connections_is_one_line_without_retries(tmp_path) -> None:
    """The host resolves but nothing answers (a firewall, a mistyped HF_ENDPOINT port): one line naming
    the source, not huggingface_hub's five retry lines over ~25 s. Through `sft prepare`, whose hub
    sources take the same check as the sharder's."""
    port = closed_port()
    env = {**ENV, "HF_ENDPOINT": f"http://127.0.0.1:{port}", "HF_HOME": str(tmp_path / "hf")}
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", *PROXY_KEYS):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-m", "orchestrator", "sft", "prepare", "--stages", "instruct", "--instruct-limit", "2",
                           "--workspace", str(tmp_path / "ws")], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert one_line(proc.stderr) == (f"orchestrate sft: error: yahma/alpaca-cleaned: cannot reach the Hugging Face Hub: "
                                     f"127.0.0.1:{port} does not accept connections (Connection refused); is the network "
                                     f"up? (HF_HUB_OFFLINE=1 reads the local cache only)")
    assert "Retry" not in proc.stdout + proc.stderr


def test_behind_a_proxy_the_hub_check_stands_aside(monkeypatch) -> None:
    """With a proxy for the endpoint's scheme, a direct connection says nothing about the Hub: the
    request (through the proxy) decides. NO_PROXY for the host brings the direct check back."""
    from huggingface_hub import constants

    from training.hub import unreachable_reason

    port = closed_port()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    for key in PROXY_KEYS:
        monkeypatch.delenv(key, raising=False)
    assert "does not accept connections" in unreachable_reason()
    monkeypatch.setenv("http_proxy", "http://proxy.example:3128")
    assert unreachable_reason() is None
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    assert "does not accept connections" in unreachable_reason()


# 10. an encode worker stopped after its error: no "Exception ignored in atexit callback" traceback ------
WORKER = """\
import atexit, multiprocessing as mp, os, signal, time
from orchestrator.tokenizer.encode import _Task, _worker_main
todo, events = mp.Queue(), mp.Queue()
todo.put(_Task("/nonexistent/shard_00000.txt", "/nonexistent/shard_00000.tok", "/nonexistent/bundle", "tokenizers", 1))
todo.put(None)
# what the parent does on the error: SIGTERM every worker, which may be in its exit handlers by then
atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(5)))
_worker_main(todo, events, os.getppid())
print(events.get(timeout=30)[0], flush=True)
"""


def test_encode_worker_stopped_while_exiting_prints_nothing() -> None:
    import signal

    proc = subprocess.run([sys.executable, "-c", WORKER], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "error"
    assert proc.stderr == ""  # was: Exception ignored in atexit callback ... SystemExit: 143
    assert proc.returncode == -signal.SIGTERM
