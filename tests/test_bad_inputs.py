"""Bad input as a new user meets it: each case ends in ONE line naming the file, key or flag, a
non-zero exit code as documented (2 = bad config, flags or data), no traceback and no damage.

Add new cases here, so the list of what podtrain answers cleanly grows in one place.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from conftest import BYTE_EOT, BYTE_VOCAB, byte_tokens, stdlib_documents, tiny_config
from training.cli import app as train_app
from training.token_shards import HEADER_SIZE, TokenShardHeader

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def one_line(text: str) -> str:
    """The whole of stderr, asserted to be a single line without a traceback."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in text, text
    return lines[0]


def write_config(tmp_path: Path, cfg: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def shard_with_a_bad_id(path: Path, bad_id: int, at: int) -> None:
    """A shard whose header is fine (vocabulary 257) with one id past it: what a foreign or
    corrupted encoder leaves, and what the writer's own range check would refuse to produce."""
    tokens = byte_tokens(stdlib_documents(40_000))
    tokens[at] = bad_id
    header = TokenShardHeader(len(tokens), BYTE_VOCAB, BYTE_EOT, 2)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.pack() + tokens.astype(np.uint16).tobytes())
    assert path.stat().st_size == HEADER_SIZE + 2 * len(tokens)


# 1. a token id >= model.vocab_size inside a shard whose header is fine ---------------------------
@pytest.mark.parametrize("position", [5, -3])  # in the first window read, and in a window a short run never reads
def test_token_id_past_the_vocabulary_names_file_and_id(byte_corpus, tmp_path, position) -> None:
    bad = tmp_path / "data" / "bad.tok"
    shard_with_a_bad_id(bad, 300, position)
    cfg = tiny_config(byte_corpus, tmp_path, train_data=str(bad), num_steps=2)
    result = CliRunner().invoke(train_app, [str(write_config(tmp_path, cfg))])
    assert result.exit_code == 2
    line = one_line(result.stderr)
    assert line.startswith(f"train: error: {bad}: token id 300 at position ") and line.endswith(">= model.vocab_size 257")
    assert not (tmp_path / "ckpt" / "final.safetensors").exists()


# 8. --resume naming no checkpoint ------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(byte_corpus, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trained")
    path = write_config(out, tiny_config(byte_corpus, out, num_steps=10, eval_every=100))
    assert CliRunner().invoke(train_app, [str(path)]).exit_code == 0
    return path


@pytest.mark.parametrize("spec", ["newest", "nope.safetensors"])  # `latest` is a tag now (seed 004's latest.pt)
def test_resume_of_no_such_checkpoint_lists_what_exists(trained, spec) -> None:
    result = CliRunner().invoke(train_app, [str(trained), "--resume", spec])
    assert result.exit_code == 2
    ckpt_dir = trained.parent / "ckpt"
    assert one_line(result.stderr) == (f"train: error: --resume {spec}: no such checkpoint; {ckpt_dir} holds best, final, latest; "
                                       f"--resume auto takes the newest")


def test_resume_by_bare_tag_name_finds_it_in_checkpoint_dir(trained) -> None:
    result = CliRunner().invoke(train_app, [str(trained), "num_steps=11", "--resume", "final"])
    assert result.exit_code == 0, result.output
    assert "at step 10" in result.output


# 9. exit codes: data errors are "bad data" (2), as docs/training.md says -------------------------
def test_missing_train_data_exits_2(byte_corpus, tmp_path) -> None:
    cfg = tiny_config(byte_corpus, tmp_path, train_data=str(tmp_path / "nowhere"))
    result = CliRunner().invoke(train_app, [str(write_config(tmp_path, cfg))])
    assert result.exit_code == 2  # was 1: data errors are "bad data", as docs/training.md says
    assert one_line(result.stderr) == f"train: error: train_data: {tmp_path / 'nowhere'} does not exist"


def test_exit_codes_in_docs_match_the_code() -> None:
    docs = (Path(__file__).resolve().parents[1] / "docs" / "training.md").read_text()
    assert "| 2 | bad config, flags or data" in docs and "| 1 | an error while running" in docs


# 10. an override with an unknown key names the command line, not the file -------------------------
def test_unknown_override_names_the_command_line(byte_corpus, tmp_path) -> None:
    path = write_config(tmp_path, tiny_config(byte_corpus, tmp_path))
    result = CliRunner().invoke(train_app, [str(path), "optimizer.betas=0.9", "--dry-run"])
    assert result.exit_code == 2
    assert one_line(result.stderr) == "train: error: command line override optimizer.betas=0.9: optimizer.betas: unknown key"


# 7. `tokenizer encode` onto a full disk names the output, not the input ---------------------------
def in_private_tmpfs(mount_point, options: str, command: str) -> subprocess.CompletedProcess:
    """Run ``command`` with a tmpfs mounted at ``mount_point`` in a private user+mount namespace."""
    shell = f"mount -t tmpfs -o {options} tmpfs {mount_point} && {command}"
    return subprocess.run(["unshare", "-rm", "sh", "-c", shell], env=ENV, capture_output=True, text=True, timeout=120)


def _can_mount_private_tmpfs() -> bool:
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_private_tmpfs(), reason="needs unshare and tmpfs mounts (user namespaces)")
def test_encode_onto_a_full_disk_names_the_output_shard(tmp_path) -> None:
    from test_tokenizer import make_documents, write_text_dir

    from orchestrator.tokenizer.bpe import prepare_tokenizer

    text = tmp_path / "text"
    write_text_dir(text, make_documents(200_000, seed=1), num_shards=1)
    bundle = prepare_tokenizer([text], tmp_path / "tok", 300)[0]
    out = tmp_path / "out"
    out.mkdir()
    # A private 64 KB filesystem: the manifest fits, the ~100 KB token shard does not.
    proc = in_private_tmpfs(out, "size=64k", f"{sys.executable} -m orchestrator tokenizer encode --text-dir {text} "
                            f"--out-dir {out} --bundle-dir {bundle.directory} --workers 1; rc=$?; ls -a {out}; exit $rc")
    assert proc.returncode == 1
    assert one_line(proc.stderr) == f"error: {out / 'shard_00000.tok'}: cannot write token shard: No space left on device"
    assert ".tmp" not in proc.stdout and "shard_00000.tok" not in proc.stdout  # nothing half-written is left


# 3. an unwritable workspace ------------------------------------------------------------------------
@pytest.fixture
def text_input(tmp_path: Path) -> Path:
    path = tmp_path / "in.txt"
    path.write_text("a first document\na second document\n")
    return path


def orchestrate(*args: str):
    from orchestrator.cli import app as orchestrate_app

    return CliRunner().invoke(orchestrate_app, list(args))


@pytest.mark.parametrize("where, reason", [
    ("/proc/podtrain-ws", "cannot create /proc/podtrain-ws: No such file or directory"),
    ("afile/ws", "{tmp}/afile is a file, not a directory"),
])
def test_unwritable_workspace_is_one_line_naming_the_path(tmp_path, text_input, monkeypatch, where, reason) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afile").write_text("not a directory")
    result = orchestrate("--input", str(text_input), "--experiment", "e", "--workspace", where)
    assert result.exit_code == 2
    root = Path(where).absolute()
    assert one_line(result.stderr) == f"orchestrate: error: --workspace {root}: not writable: {reason.format(tmp=tmp_path)}"


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_private_tmpfs(), reason="needs unshare and tmpfs mounts (user namespaces)")
def test_read_only_workspace_is_one_line(tmp_path, text_input) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    proc = in_private_tmpfs(ws, "ro,size=64k", f"{sys.executable} -m orchestrator --input {text_input} "
                            f"--experiment e --workspace {ws}")
    assert proc.returncode == 2
    assert one_line(proc.stderr) == f"orchestrate: error: --workspace {ws}: not writable: cannot create {ws}/runs: Read-only file system"


# 6. two orchestrate runs on one experiment ------------------------------------------------------------
def test_second_run_on_an_experiment_names_the_holder(tmp_path, text_input) -> None:
    import socket

    lock = tmp_path / "ws" / "runs" / "e" / ".orchestrate.lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from orchestrator.lock import ExperimentLock; "
                               f"ExperimentLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(lock)],
                              env=ENV, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = orchestrate("--input", str(text_input), "--experiment", "e", "--workspace", str(tmp_path / "ws"))
        assert result.exit_code == 2
        line = one_line(result.stderr)
        assert line.startswith(f"orchestrate: error: experiment e is in use by PID {holder.pid} on host {socket.gethostname()} (since ")
        assert line.endswith(f"wait for it to finish or stop it (lock: {lock})")
        assert not (tmp_path / "ws" / "datasets").exists()  # refused before touching anything
    finally:
        holder.kill()  # kill -9: the kernel drops the lock with its holder, nothing stale is left
        holder.wait()
    from orchestrator.lock import ExperimentLock

    ExperimentLock(lock).acquire().release()


# 10. the empty volumeName, and hf: errors naming --input ---------------------------------------------
def test_empty_volume_name_is_not_called_a_placeholder(tmp_path) -> None:
    from orchestrator.pods.manifest import ManifestError, load_manifest

    shipped = Path(__file__).resolve().parents[1] / "infra" / "runpod-pod.yaml"
    manifest = tmp_path / "pod.yaml"
    manifest.write_text(shipped.read_text().replace("volumeName: YOUR_VOLUME_ID", 'volumeName: ""'))
    with pytest.raises(ManifestError) as err:
        load_manifest(manifest)
    assert str(err.value) == (f"{manifest}: volumeMounts[0].volumeName: is empty: set your network volume id; find it "
                              "with `orchestrate volume list` or the console's Storage page")


def test_hf_input_errors_name_the_input_flag(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = orchestrate("--input", "hf:nosuch/thing", "--experiment", "e", "--workspace", str(tmp_path / "ws"))
    assert result.exit_code == 2
    assert one_line(result.stderr) == ("orchestrate: error: stage shard failed: --input hf:nosuch/thing: cannot reach "
                                       "the Hugging Face Hub: offline mode is on (HF_HUB_OFFLINE=1)")


# 4. a bad shard in a 2-rank run: the error once, and through orchestrate its exit code ------------
TORCHRUN_REPORT = """\
W1202 19:53:33.704000 8855 torch/distributed/elastic/multiprocessing/api.py:1028] Sending process 8929 closing signal SIGTERM
Traceback (most recent call last):
  File "<frozen runpy>", line 198, in _run_module_as_main
  File "<frozen runpy>", line 88, in _run_code
  File "/venv/lib/python3.11/site-packages/torch/distributed/run.py", line 1032, in <module>
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
Root Cause (first observed failure):
[0]:
  rank      : 0 (local_rank: 0)
  exitcode  : 2 (pid: 8928)
============================================================
"""


def test_torchrun_report_is_dropped_and_a_rank_traceback_kept() -> None:
    from orchestrator.torchrun_output import TorchrunFilter

    rank_crash = 'Traceback (most recent call last):\n  File "<frozen runpy>", line 198\n  File "/x/training/trainer.py", line 9\nZeroDivisionError: boom\n'
    kept: list[str] = []
    filt = TorchrunFilter(kept.append)
    for line in (rank_crash + TORCHRUN_REPORT).splitlines(keepends=True):
        filt.feed(line)
    filt.flush()
    assert "".join(kept) == rank_crash and filt.exit_code == 2


@pytest.mark.slow
def test_bad_shard_on_two_ranks_is_one_line_and_exit_2_through_orchestrate(byte_corpus, tmp_path, capfd) -> None:
    from rich.console import Console

    from orchestrator.launch import launch_training

    bad = tmp_path / "data" / "bad.tok"
    shard_with_a_bad_id(bad, 300, 5)
    cfg = tiny_config(byte_corpus, tmp_path, train_data=str(bad), batch_size=4)
    cfg["distributed"] = {"timeout_s": 60}
    code = launch_training(write_config(tmp_path, cfg), 2, Console(file=open(os.devnull, "w")))
    assert code == 2  # the rank's own code, not torchrun's 1
    line = one_line(capfd.readouterr().err)  # printed by rank 0 only, torchrun's failure table dropped
    assert line.startswith(f"train: error: {bad}: token id 300 at position 5")
