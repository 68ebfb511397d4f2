"""``orchestrate evaluate|sample|export``: use a trained checkpoint.

    orchestrate evaluate CHECKPOINT|--checkpoint PATH [--data|--processed-dir PATH...] [--batch-size N --seq-len N --max-batches N]
                         [--dataset-limit name=N,...] [--recipe FILE] [--harness TASKS] [--json FILE]
    orchestrate sample   CHECKPOINT --prompt TEXT | --prompt-file FILE [--max-new-tokens --temperature --top-k --top-p --seed]
                         [--chat [--system TEXT]]
    orchestrate export   CHECKPOINT --to hf OUT_DIR

CHECKPOINT is a tag path (``.../checkpoints/best``, with or without ``.safetensors``) or a
checkpoint directory (its newest tag). Errors are one line on stderr and exit 2 (docs/evaluate.md).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.table import Table

from sharder.recipe import parse_dataset_limits
from training.atomic import atomic_write_json

EXIT_USAGE = 2
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None, no_args_is_help=True,
                  help=__doc__)


def _fail(command: str, message: str) -> None:
    print(f"{command}: error: {message}", file=sys.stderr, flush=True)
    raise typer.Exit(EXIT_USAGE)


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _recipe_sources(recipe: str | None, val_data: str | list[str] | None) -> tuple[list, int]:
    """(resolved sources, min_text_length) of ``--recipe``, else of the recipe the run's data was sharded from.

    The run's chain is token shards -> their manifest's text_dir -> the text manifest's recipe source.
    """
    from sharder.recipe import SourceConfig, load_recipe

    if recipe:
        loaded = load_recipe(recipe)
        return list(loaded.sources), loaded.min_text_length
    first = val_data if isinstance(val_data, str) else (val_data or [None])[0]
    token_manifest = Path(first or "") / "manifest.json"
    try:
        text_dir = json.loads(token_manifest.read_text(encoding="utf-8"))["source"]["text_dir"]
        source = json.loads((Path(text_dir) / "manifest.json").read_text(encoding="utf-8"))["source"]
    except (OSError, KeyError, TypeError, json.JSONDecodeError):
        raise ValueError(f"--dataset-limit: the run's data ({first}) does not trace back to a data recipe; pass --recipe FILE") from None
    if source.get("type") != "recipe":
        raise ValueError(f"--dataset-limit: {text_dir} was sharded from {source.get('type')!r} data, not a recipe; pass --recipe FILE")
    return [SourceConfig.model_validate(s) for s in source["sources"]], int(source.get("min_text_length", 1))


def _datasets(ck, data: list[str], limits: dict[str, int], recipe: str | None, text_field: str,
              tokenizer_path: str | None, batch_size: int, seq_len: int, max_batches: int | None):
    """(name, a function giving its batches) for each thing to evaluate."""
    from training.data import TokenStream, iter_eval_batches, resolve_shards
    from training.evaluate import read_text_documents, token_windows, tokenize_documents
    from training.inference import load_tokenizer

    cfg = ck.config
    found = []
    if not data and not limits:
        if not cfg.val_data:
            raise ValueError("the checkpoint's run has no val_data: pass --data PATH")
        stream = TokenStream(resolve_shards(cfg.val_data, "val_data"), cfg.seed, cfg.model.vocab_size, key="val_data")
        steps = max_batches or cfg.eval_steps
        found.append(("val_data", lambda: iter_eval_batches(stream, batch_size, seq_len, steps, 0, 1)))
    tok = None
    for item in data:
        path = Path(item)
        if path.is_dir() or path.name.endswith(".tok") or any(ch in item for ch in "*?["):
            stream = TokenStream(resolve_shards(item, "--data"), cfg.seed, cfg.model.vocab_size, key="--data")
            found.append((item, lambda s=stream: iter_eval_batches(s, batch_size, seq_len, max_batches or cfg.eval_steps, 0, 1)))
            continue
        if not path.is_file():
            raise ValueError(f"--data {item}: no such file or directory")
        tok = tok or load_tokenizer(cfg, tokenizer_path)
        tokens = tokenize_documents(read_text_documents(path, text_field), tok, _eot_id(tok))
        found.append((item, lambda t=tokens: token_windows(t, batch_size, seq_len, max_batches)))
    if limits:
        from sharder.mix import TEXT_COLUMN, source_dataset
        from sharder.sources import hf_environment

        found_sources, min_length = _recipe_sources(recipe, cfg.val_data)
        sources = {s.label: (i, s) for i, s in enumerate(found_sources)}
        unknown = [name for name in limits if name not in sources]
        if unknown:
            raise ValueError(f"--dataset-limit: unknown source {unknown[0]!r} (the recipe has: {', '.join(sources)})")
        tok = tok or load_tokenizer(cfg, tokenizer_path)
        cache_dir, token = hf_environment(Path("workspace"))
        for name, limit in limits.items():
            index, src = sources[name]
            rows = source_dataset(src, index, min_length, f"--dataset-limit {name}", cache_dir, token).with_format(None).take(limit)
            tokens = tokenize_documents((row[TEXT_COLUMN] for row in rows), tok, _eot_id(tok), limit)
            found.append((name, lambda t=tokens: token_windows(t, batch_size, seq_len, max_batches)))
    return found


def _eot_id(tok) -> int | None:
    vocab = tok.get_vocab(with_added_tokens=True)
    return next((vocab[t] for t in ("<|endoftext|>", "</s>", "<eos>") if t in vocab), None)


@app.command("evaluate")
def evaluate_cmd(
    checkpoint_arg: Optional[str] = typer.Argument(None, metavar="CHECKPOINT", help="tag path or checkpoint directory"),
    checkpoint_opt: Optional[str] = typer.Option(None, "--checkpoint", help="the same as CHECKPOINT (seed 004's evaluate_perplexity.py flag)"),
    data: Optional[List[str]] = typer.Option(None, "--data", "--processed-dir",
                                             help="token shards (dir/glob/.tok) or text/jsonl/parquet files; default: the run's val_data"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="default: the run's batch_size"),
    seq_len: Optional[int] = typer.Option(None, "--seq-len", min=1, help="default: the run's seq_len"),
    max_batches: Optional[int] = typer.Option(None, "--max-batches", min=1, help="default: the run's eval_steps for shards, all windows for files"),
    dataset_limit: Optional[str] = typer.Option(None, "--dataset-limit", help="name=N,...: N documents of each recipe source, one row each"),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="the data recipe for --dataset-limit (default: the one the run's data came from)"),
    text_field: str = typer.Option("text", "--text-field", help="jsonl/parquet column holding the text"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer.json or folder (default: the run's tokenizer_path)"),
    device: str = typer.Option("auto", "--device"),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32|bfloat16|float16 (default: float32 on CPU, the run's dtype on GPU, as the trainer)"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="where to write the results (default: <checkpoint dir>/evaluate_<tag>.json)"),
    harness: Optional[str] = typer.Option(None, "--harness", help="lm-evaluation-harness tasks (comma-separated), run on an HF export"),
    harness_limit: Optional[int] = typer.Option(None, "--harness-limit", min=1, help="examples per harness task (a quick look)"),
    include_path: Optional[str] = typer.Option(None, "--harness-include", help="a folder of extra task YAMLs for the harness"),
) -> None:
    """Loss and perplexity on token shards, text files, each recipe source, or the run's own val data."""
    from training.evaluate import mean_loss, perplexity
    from training.inference import load_checkpoint, resolve_device
    from training.precision import resolve_precision

    console = _console()
    if (checkpoint_arg is None) == (checkpoint_opt is None):
        _fail("evaluate", "give the checkpoint once: as CHECKPOINT or as --checkpoint PATH")
    checkpoint = checkpoint_arg or checkpoint_opt
    try:
        limits = parse_dataset_limits(dataset_limit) if dataset_limit else {}
        dev = resolve_device(device)
        ck = load_checkpoint(checkpoint, dev)
        cfg = ck.config
        precision = resolve_precision(dtype or cfg.dtype, dtype is not None, dev, fsdp=False)
        bs, sl = batch_size or cfg.batch_size, seq_len or cfg.seq_len
        if sl > cfg.model.max_seq_len:
            raise ValueError(f"--seq-len {sl}: exceeds the model's max_seq_len {cfg.model.max_seq_len}")
        rows = []
        if not harness or data or limits:
            for name, batches in _datasets(ck, list(data or []), limits, recipe, text_field, tokenizer, bs, sl, max_batches):
                t0 = time.perf_counter()
                counted = _Counted(batches())
                try:
                    loss = float(mean_loss(ck.model, counted, dev, precision.autocast))
                except ValueError as exc:  # no batches: say which data gave none
                    raise ValueError(f"{name if name == 'val_data' else f'--data {name}'}: {exc}") from None
                seconds = time.perf_counter() - t0
                rows.append({"data": name, "batches": counted.batches, "tokens": counted.tokens, "loss": loss,
                             "perplexity": perplexity(loss), "tokens_per_s": counted.tokens / seconds if seconds else 0.0})
        harness_results = None
        if harness:
            from training.harness import run_harness

            harness_results = run_harness(ck, harness, harness_limit, include_path, str(dev), console)
    except (ValueError, OSError) as exc:
        _fail("evaluate", " ".join(str(exc).split()))
    table = Table(title=f"evaluate {ck.base}")
    for col in ("data", "batches", "tokens", "loss", "perplexity", "tokens/s"):
        table.add_column(col, justify="left" if col == "data" else "right")
    for r in rows:
        table.add_row(r["data"], str(r["batches"]), f"{r['tokens']:,}", f"{r['loss']:.4f}", f"{r['perplexity']:.2f}", f"{r['tokens_per_s']:,.0f}")
    if rows:
        console.print(table)
    report = {"checkpoint": str(ck.base), "batch_size": bs, "seq_len": sl, "precision": precision.reason, "results": rows}
    if harness_results is not None:
        report["harness"] = harness_results
    out = json_out or ck.base.parent / f"evaluate_{ck.base.name}.json"
    atomic_write_json(out, report)
    console.print(f"results: {out}", markup=False)


class _Counted:
    """Batches passed through, counted (for the table's tokens and throughput)."""

    def __init__(self, batches) -> None:
        self.inner, self.batches, self.tokens = batches, 0, 0

    def __iter__(self):
        for x, y in self.inner:
            self.batches += 1
            self.tokens += int(y.numel())
            yield x, y


def _chat_tokenizer(cfg, override: str | None):
    """The chat template's tokenizer of a fine-tuned run (its tokenizer_path is a chat bundle)."""
    from training.sft.template import ChatTokenizer, TemplateError

    where = Path(override or cfg.tokenizer_path or "")
    try:
        return ChatTokenizer.load(where.parent if where.name == "tokenizer.json" else where)
    except TemplateError as exc:
        raise ValueError(f"--chat: {exc}") from None


@app.command("sample")
def sample_cmd(
    checkpoint: str = typer.Argument(..., help="tag path or checkpoint directory"),
    prompt: Optional[List[str]] = typer.Option(None, "--prompt", help="a prompt (repeatable)"),
    prompt_file: Optional[Path] = typer.Option(None, "--prompt-file", help="one prompt per line (\\n inside a prompt: a literal backslash-n)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=0),
    temperature: float = typer.Option(0.8, "--temperature", help="0 = greedy"),
    top_k: Optional[int] = typer.Option(None, "--top-k"),
    top_p: Optional[float] = typer.Option(None, "--top-p"),
    seed: int = typer.Option(0, "--seed"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer.json or folder (default: the run's tokenizer_path)"),
    device: str = typer.Option("auto", "--device"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write prompts, completions and token ids here"),
    chat: bool = typer.Option(False, "--chat", help="each prompt is a user message to a fine-tuned model, "
                              "through the chat template of its tokenizer (docs/finetune.md); the reply ends at <|end|>"),
    system: Optional[str] = typer.Option(None, "--system", help="with --chat: a system message before each prompt"),
) -> None:
    """Continue prompts with the KV cache (or, with --chat, answer them); a prompt file gives a table of completions."""
    from training.generate import SamplingParams, generate
    from training.inference import load_checkpoint, load_tokenizer, resolve_device

    console = _console()
    try:
        prompts = list(prompt or [])
        if prompt_file is not None:
            try:
                lines = prompt_file.read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise ValueError(f"--prompt-file {prompt_file}: {exc.strerror}") from None
            prompts += [line.replace("\\n", "\n") for line in lines if line.strip()]
        if not prompts:
            raise ValueError("no prompt: pass --prompt TEXT or --prompt-file FILE")
        dev = resolve_device(device)
        ck = load_checkpoint(checkpoint, dev)
        tok = load_tokenizer(ck.config, tokenizer)
        eot = _eot_id(tok)
        talk = _chat_tokenizer(ck.config, tokenizer) if chat else None
        results = []
        t0, new_tokens = time.perf_counter(), 0
        for i, text in enumerate(prompts):
            params = SamplingParams(max_new_tokens, temperature, top_k, top_p, seed + i, eot)
            if talk is not None:
                from training.sft.chat import reply_ids

                messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
                ids = reply_ids(ck.model, talk, messages, params)
            else:
                ids = generate(ck.model, tok.encode(text, add_special_tokens=False).ids, params)
            new_tokens += len(ids)
            results.append({"prompt": text, "completion": tok.decode(ids, skip_special_tokens=True), "ids": ids})
        seconds = time.perf_counter() - t0
    except (ValueError, OSError) as exc:
        _fail("sample", " ".join(str(exc).split()))
    if len(results) == 1 and prompt_file is None:
        console.print(results[0]["completion"] if chat else results[0]["prompt"] + results[0]["completion"], markup=False)
    else:
        table = Table(title=f"samples from {ck.base} (temperature {temperature})", show_lines=True)
        table.add_column("prompt", overflow="fold")
        table.add_column("completion", overflow="fold")
        for r in results:
            table.add_row(r["prompt"], r["completion"])
        console.print(table)
    console.print(f"{new_tokens} new tokens in {seconds:.2f}s ({new_tokens / seconds if seconds else 0:,.1f} tokens/s, KV cache)", markup=False)
    if json_out is not None:
        atomic_write_json(json_out, {"checkpoint": str(ck.base), "temperature": temperature, "top_k": top_k, "top_p": top_p,
                                     "seed": seed, "samples": results})


@app.command("export")
def export_cmd(
    checkpoint: str = typer.Argument(..., help="tag path or checkpoint directory"),
    to: str = typer.Option(..., "--to", help="format: hf"),
    out_dir: Path = typer.Argument(..., help="the folder to write (config.json, model.safetensors, tokenizer files)"),
    tokenizer: Optional[str] = typer.Option(None, "--tokenizer", help="tokenizer folder or tokenizer.json (default: the run's tokenizer_path)"),
    max_shard_size: str = typer.Option("5GB", "--max-shard-size", help="split model.safetensors above this size (500MB, 5GB...)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a non-empty OUT_DIR"),
) -> None:
    """Write a Hugging Face model folder: AutoModelForCausalLM / AutoTokenizer load it as is."""
    from orchestrator.tokenizer.cli import parse_size
    from training.hf import export
    from training.inference import find_checkpoint

    console = _console()
    t0 = time.perf_counter()
    try:
        if to != "hf":
            raise ValueError(f"--to {to!r}: the only export format is hf")
        base, raw = find_checkpoint(checkpoint)
        report = export(Path(f"{base}.safetensors"), raw, out_dir, tokenizer=tokenizer,
                        max_shard_bytes=parse_size(max_shard_size), overwrite=overwrite)
    except typer.BadParameter as exc:
        _fail("export", f"--max-shard-size: {exc}")
    except (ValueError, OSError) as exc:
        _fail("export", " ".join(str(exc).split()))
    seconds = time.perf_counter() - t0
    console.print(f"export: {base} -> {report.out_dir} ({report.architecture}, {report.num_tensors} tensors, "
                  f"{report.bytes / 1e6:,.1f} MB in {seconds:.1f}s, {report.bytes / 1e6 / max(seconds, 1e-9):,.0f} MB/s)", markup=False)
    console.print(f"files: {', '.join(report.files)}", markup=False)
    console.print(f"tokenizer: {report.tokenizer}", markup=False)


if __name__ == "__main__":
    app()
