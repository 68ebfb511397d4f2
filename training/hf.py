"""Hugging Face ``transformers`` models in and out: config and weight mapping, both ways.

Two families map onto podtrain's model, each one to one:

- **Llama** (``LlamaForCausalLM``): RMSNorm, RoPE (``rotate_half``, the layout podtrain uses, so
  no permutation), SwiGLU, GQA, tied or untied head. podtrain's names are HF's without the
  ``model.`` prefix.
- **GPT-2** (``GPT2LMHeadModel``): LayerNorm, learned positions, tanh-GELU, biases, tied head. Its
  ``Conv1D`` stores weights as (in, out), the transpose of ``nn.Linear``, and fuses q, k, v in
  ``c_attn``; both are undone on import and redone on export.

Anything else (parallel blocks, a mixture of experts, LayerNorm with RoPE...) has no HF equivalent
here and the export refuses with one line naming the option. Weights move tensor by tensor
(``safe_open`` in, a streaming writer out), so exporting a 1B checkpoint holds about one tensor at
a time beyond what the safetensors files map, not a second copy of the model.
"""

from __future__ import annotations

import glob
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import safetensors
import torch

from training.checkpoint import TORCH_DTYPES, LazyTensor, write_safetensors
from training.config import ModelConfig

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json")
DEFAULT_SHARD_BYTES = 5 * 1024**3  # transformers' own default max_shard_size
EXPORTING = ".podtrain-export"  # inside an export's temporary folder until it is renamed into place


class HFError(ValueError):
    """A Hugging Face model cannot be imported or a checkpoint exported; one line naming the cause."""


# --------------------------------------------------------------------------------------- import

def local_folder(location: str, spec: str) -> Path:
    """A local folder as is; a hub id downloaded (or found in the HF cache) with its config, weights and tokenizer."""
    path = Path(location)
    if path.is_dir():
        return path
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(location, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model"]))
    except Exception as exc:  # offline, unknown repo, gated: huggingface_hub raises several types
        from huggingface_hub import constants

        detail = ("not in the local Hugging Face cache, and HF_HUB_OFFLINE=1 keeps the hub from being asked"
                  if constants.HF_HUB_OFFLINE else " ".join(str(exc).split())[:200])
        raise HFError(f"init_from {spec}: not a local checkpoint or folder, and not fetched from the Hugging Face hub ({detail})") from None


def read_hf_config(folder: Path, spec: str) -> dict[str, Any]:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise HFError(f"init_from {spec}: {folder / 'config.json'}: unreadable ({exc})") from None


def _rope_theta(hf: dict[str, Any]) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise HFError(f"rope_type {kind!r}: podtrain implements plain RoPE only")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def hf_config_to_model(hf: dict[str, Any]) -> dict[str, Any]:
    """podtrain's ``model`` section for an HF config dict (Llama or GPT-2)."""
    kind = hf.get("model_type")
    if kind == "llama":
        if hf.get("hidden_act", "silu") != "silu":
            raise HFError(f"hidden_act {hf['hidden_act']!r}: podtrain's SwiGLU uses silu")
        if bool(hf.get("attention_bias")) != bool(hf.get("mlp_bias")):
            raise HFError("attention_bias and mlp_bias differ: podtrain has one bias switch for both")
        d, heads = hf["hidden_size"], hf["num_attention_heads"]
        if hf.get("head_dim") not in (None, d // heads):
            raise HFError(f"head_dim {hf['head_dim']} is not hidden_size / num_attention_heads ({d // heads})")
        return {"vocab_size": hf["vocab_size"], "d_model": d, "num_layers": hf["num_hidden_layers"],
                "max_seq_len": hf.get("max_position_embeddings", 2048), "dropout": float(hf.get("attention_dropout", 0.0)),
                "tie_embeddings": bool(hf.get("tie_word_embeddings", False)), "bias": bool(hf.get("attention_bias")),
                "attention": {"n_heads": heads, "n_kv_heads": hf.get("num_key_value_heads") or heads},
                "positional": {"type": "rope", "theta": _rope_theta(hf)},
                "ffn": {"type": "swiglu", "hidden_size": hf["intermediate_size"]},
                "norm": {"type": "rmsnorm", "eps": float(hf.get("rms_norm_eps", 1e-6))}}
    if kind == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise HFError(f"activation_function {hf['activation_function']!r}: podtrain's GELU is the tanh one (gelu_new)")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            raise HFError("scale_attn_by_inverse_layer_idx / scale_attn_weights: podtrain scales attention by 1/sqrt(head_dim)")
        d = hf["n_embd"]
        return {"vocab_size": hf["vocab_size"], "d_model": d, "num_layers": hf["n_layer"], "max_seq_len": hf["n_positions"],
                "dropout": float(hf.get("resid_pdrop", 0.0)), "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
                "bias": True, "attention": {"n_heads": hf["n_head"]}, "positional": {"type": "learned"},
                "ffn": {"type": "gelu", "hidden_size": hf.get("n_inner") or 4 * d},
                "norm": {"type": "layernorm", "eps": float(hf.get("layer_norm_epsilon", 1e-5))}}
    raise HFError(f"model_type {kind!r}: podtrain maps the llama and gpt2 families only")


def hf_to_model_config(location: str, spec: str) -> tuple[dict[str, Any], str | None]:
    """(podtrain ``model`` section, tokenizer folder or None) of an HF folder or hub id."""
    folder = local_folder(location, spec)
    try:
        model = hf_config_to_model(read_hf_config(folder, spec))
    except HFError as exc:
        raise HFError(f"init_from {spec}: {folder / 'config.json'}: {exc}") from None
    has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    return model, str(folder) if has_tokenizer else None


def _gpt2_names(cfg: ModelConfig) -> Iterator[tuple[str, list[str], Callable, Callable]]:
    """(HF name, podtrain names, HF tensor -> podtrain tensors, podtrain tensors -> HF tensor) for GPT-2."""
    same = (lambda t: [t], lambda ts: ts[0])
    transposed = (lambda t: [t.t().contiguous()], lambda ts: ts[0].t().contiguous())
    yield "transformer.wte.weight", ["embed_tokens.weight"], *same
    yield "transformer.wpe.weight", ["embed_positions.weight"], *same
    for i in range(cfg.num_layers):
        h, p = f"transformer.h.{i}", f"layers.{i}"
        for hf_ln, ln in (("ln_1", "input_layernorm"), ("ln_2", "post_attention_layernorm")):
            yield f"{h}.{hf_ln}.weight", [f"{p}.{ln}.weight"], *same
            yield f"{h}.{hf_ln}.bias", [f"{p}.{ln}.bias"], *same
        qkv = [f"{p}.self_attn.{n}_proj" for n in "qkv"]
        yield (f"{h}.attn.c_attn.weight", [f"{n}.weight" for n in qkv],
               lambda t: [w.t().contiguous() for w in t.chunk(3, dim=1)], lambda ts: torch.cat(ts, dim=0).t().contiguous())
        yield f"{h}.attn.c_attn.bias", [f"{n}.bias" for n in qkv], lambda t: [b.clone() for b in t.chunk(3)], lambda ts: torch.cat(ts)
        for hf_lin, lin in (("attn.c_proj", "self_attn.o_proj"), ("mlp.c_fc", "mlp.up_proj"), ("mlp.c_proj", "mlp.down_proj")):
            yield f"{h}.{hf_lin}.weight", [f"{p}.{lin}.weight"], *transposed
            yield f"{h}.{hf_lin}.bias", [f"{p}.{lin}.bias"], *same
    yield "transformer.ln_f.weight", ["norm.weight"], *same
    yield "transformer.ln_f.bias", ["norm.bias"], *same
    if not cfg.tie_embeddings:
        yield "lm_head.weight", ["lm_head.weight"], *same


def _llama_names(cfg: ModelConfig, podtrain_names: list[str]) -> Iterator[tuple[str, list[str], Callable, Callable]]:
    for name in podtrain_names:
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue
        yield (name if name == "lm_head.weight" else f"model.{name}"), [name], lambda t: [t], lambda ts: ts[0]


def is_gpt2(cfg: ModelConfig) -> bool:
    return cfg.positional.type == "learned"


def mapping(cfg: ModelConfig) -> list[tuple[str, list[str], Callable, Callable]]:
    """The name map of ``cfg``'s family (podtrain names from a model on the meta device: no memory)."""
    if is_gpt2(cfg):
        return list(_gpt2_names(cfg))
    from training.model import build_meta_model

    return list(_llama_names(cfg, list(build_meta_model(cfg).state_dict())))


class _Reader:
    """Tensors of an HF folder by name, one at a time (safetensors, sharded or not; else torch .bin)."""

    def __init__(self, folder: Path, spec: str) -> None:
        self.files: dict[str, Path] = {}
        index = next((folder / n for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json") if (folder / n).is_file()), None)
        if index is not None:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            self.files = {k: folder / v for k, v in weight_map.items()}
        else:
            single = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
            if single is None:
                raise HFError(f"init_from {spec}: {folder}: no model.safetensors or pytorch_model.bin")
            self.files = {k: single for k in self._keys(single)}
        self._open: dict[Path, Any] = {}

    @staticmethod
    def _keys(path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            with safetensors.safe_open(str(path), framework="pt") as fh:
                return list(fh.keys())
        return list(torch.load(path, map_location="cpu", weights_only=True, mmap=True))

    def get(self, name: str) -> torch.Tensor | None:
        """``name``, or the same without the ``transformer.``/``model.`` prefix: the hub's ``gpt2`` files
        were saved from the base ``GPT2Model`` (``h.0.attn.c_attn.weight``, ``wte.weight``)."""
        if name not in self.files:
            name = name.partition(".")[2]
        path = self.files.get(name)
        if path is None:
            return None
        if path not in self._open:
            self._open[path] = (safetensors.safe_open(str(path), framework="pt") if path.suffix == ".safetensors"
                                else torch.load(path, map_location="cpu", weights_only=True, mmap=True))
        handle = self._open[path]
        return handle.get_tensor(name) if path.suffix == ".safetensors" else handle[name]


def load_hf_weights(location: str, cfg: ModelConfig, spec: str) -> dict[str, torch.Tensor]:
    """The HF model's weights under podtrain names; a missing tensor is one line naming it.

    Shapes are left to the caller's check against the model, which names the tensor and both shapes.
    """
    folder = local_folder(location, spec)
    reader = _Reader(folder, spec)
    out: dict[str, torch.Tensor] = {}
    for hf_name, names, to_podtrain, _ in mapping(cfg):
        tensor = reader.get(hf_name)
        if tensor is None and hf_name == "lm_head.weight":
            tensor = reader.get("model.embed_tokens.weight")  # untied in the config but saved once
        if tensor is None:
            raise HFError(f"init_from {spec}: {folder}: tensor {hf_name} is missing")
        out.update(zip(names, to_podtrain(tensor)))
    return out


# --------------------------------------------------------------------------------------- export

def model_to_hf_config(cfg: ModelConfig, dtype: str) -> dict[str, Any]:
    """The HF ``config.json`` of ``cfg``, or HFError naming the option with no HF equivalent."""
    if cfg.parallel_layers:
        raise HFError("parallel_layers: true has no Hugging Face Llama/GPT-2 equivalent (attention and MLP in parallel)")
    if cfg.ffn.type == "moe":
        raise HFError("ffn.type: moe has no Hugging Face equivalent in podtrain's export (no Mixtral mapping)")
    if cfg.attention.type == "complex":
        raise HFError("attention.type: complex has no Hugging Face equivalent (training/complex_attention.py)")
    common = {"vocab_size": cfg.vocab_size, "tie_word_embeddings": cfg.tie_embeddings, "dtype": dtype, "use_cache": True}
    if is_gpt2(cfg):
        for ok, option in ((cfg.norm.type == "layernorm", f"norm.type: {cfg.norm.type}"),
                           (cfg.ffn.type == "gelu", f"ffn.type: {cfg.ffn.type}"),
                           (cfg.bias, "bias: false"), (cfg.tie_embeddings, "tie_embeddings: false"),
                           (cfg.n_kv_heads == cfg.attention.n_heads, f"attention.n_kv_heads: {cfg.n_kv_heads}")):
            if not ok:
                raise HFError(f"{option} with positional.type: learned has no Hugging Face equivalent (GPT-2 needs "
                              f"layernorm, gelu, bias, tied embeddings and no GQA)")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "n_embd": cfg.d_model, "n_layer": cfg.num_layers,
                "n_head": cfg.attention.n_heads, "n_positions": cfg.max_seq_len, "n_inner": cfg.ffn_hidden,
                "activation_function": "gelu_new", "layer_norm_epsilon": cfg.norm.eps, "resid_pdrop": cfg.dropout,
                "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "scale_attn_weights": True,
                "initializer_range": cfg.init_std, **common}
    for ok, option in ((cfg.norm.type == "rmsnorm", f"norm.type: {cfg.norm.type}"), (cfg.ffn.type == "swiglu", f"ffn.type: {cfg.ffn.type}")):
        if not ok:
            raise HFError(f"{option} with positional.type: rope has no Hugging Face equivalent (Llama needs rmsnorm and swiglu)")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.d_model,
            "intermediate_size": cfg.ffn_hidden, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.attention.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
            "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm.eps, "rope_theta": cfg.positional.theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": cfg.positional.theta},
            "attention_bias": cfg.bias, "mlp_bias": cfg.bias, "attention_dropout": cfg.dropout,
            "initializer_range": cfg.init_std, **common}


@dataclass
class ExportReport:
    out_dir: Path
    architecture: str
    files: list[str]
    num_tensors: int
    bytes: int
    tokenizer: str


def _plan_shards(entries: list[tuple[str, LazyTensor]], max_bytes: int) -> list[list[tuple[str, LazyTensor]]]:
    shards: list[list[tuple[str, LazyTensor]]] = [[]]
    size = 0
    for name, lazy in entries:
        if shards[-1] and size + lazy.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, lazy))
        size += lazy.nbytes
    return shards


def export_weights(weights_path: Path, cfg: ModelConfig, out: Path, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> tuple[list[str], int, int]:
    """Write the HF weight files of a podtrain ``.safetensors`` into ``out``, tensor by tensor.

    Returns (file names, tensors, bytes). A GPT-2 ``c_attn`` is built from q, k, v when its turn
    comes, so at most one fused tensor exists at a time.
    """
    with safetensors.safe_open(str(weights_path), framework="pt") as fh:
        names = set(fh.keys())
        tied_from_embed = cfg.tie_embeddings and "lm_head.weight" not in names

        def read(name: str) -> torch.Tensor:
            return fh.get_tensor("embed_tokens.weight" if name == "lm_head.weight" and tied_from_embed else name)

        entries: list[tuple[str, LazyTensor]] = []
        for hf_name, pod_names, _, to_hf in mapping(cfg):
            missing = [n for n in pod_names if n not in names and not (n == "lm_head.weight" and tied_from_embed)]
            if missing:
                raise HFError(f"{weights_path}: tensor {missing[0]} is missing (a checkpoint of another model config?)")
            slices = [fh.get_slice("embed_tokens.weight" if n == "lm_head.weight" and tied_from_embed else n) for n in pod_names]
            dtype = TORCH_DTYPES[slices[0].get_dtype()]
            shape = list(to_hf([torch.empty(s.get_shape(), device="meta") for s in slices]).shape)
            entries.append((hf_name, LazyTensor(shape, dtype, lambda ns=pod_names, f=to_hf: f([read(n) for n in ns]))))
        shards = _plan_shards(entries, max_shard_bytes)
        files = ["model.safetensors"] if len(shards) == 1 else [
            f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for file, shard in zip(files, shards):
            write_safetensors(out / file, dict(shard), {"format": "pt"})
    total = sum(lazy.nbytes for _, lazy in entries)
    if len(shards) > 1:
        weight_map = {name: file for file, shard in zip(files, shards) for name, _ in shard}
        (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        files.append("model.safetensors.index.json")
    return files, len(entries), total


def export_tokenizer(tokenizer_path: str | None, out: Path) -> tuple[str, dict[str, int]]:
    """Write tokenizer files into ``out``; returns (a description, special token ids for the configs).

    An HF tokenizer folder (``init_from`` an HF model) is copied; a podtrain bundle's
    ``tokenizer.json`` is wrapped in ``PreTrainedTokenizerFast`` with its end-of-text and pad tokens.
    """
    if not tokenizer_path:
        return "none (the checkpoint config has no tokenizer_path; pass --tokenizer)", {}
    src = Path(tokenizer_path)
    if src.is_file() and src.name == "tokenizer.json":
        src = src.parent
    if not (src / "tokenizer.json").is_file() and not (src / "tokenizer_config.json").is_file():
        raise HFError(f"tokenizer {tokenizer_path}: no tokenizer.json or tokenizer_config.json there")
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if (src / "tokenizer_config.json").is_file():
        tok = AutoTokenizer.from_pretrained(str(src))
    else:
        from tokenizers import Tokenizer

        raw = Tokenizer.from_file(str(src / "tokenizer.json"))
        vocab = raw.get_vocab(with_added_tokens=True)
        eos = next((t for t in ("<|endoftext|>", "</s>", "<eos>") if t in vocab), None)
        pad = next((t for t in ("<|pad|>", "<pad>") if t in vocab), eos)
        tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=eos, pad_token=pad, bos_token=None,
                                      model_max_length=int(1e30), clean_up_tokenization_spaces=False)
    tok.save_pretrained(str(out))
    ids = {k: v for k, v in (("eos_token_id", tok.eos_token_id), ("bos_token_id", tok.bos_token_id),
                             ("pad_token_id", tok.pad_token_id)) if v is not None}
    return str(src), ids


def export(weights_path: Path, train_config: dict[str, Any], out_dir: Path, *, tokenizer: str | None = None,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES, overwrite: bool = False) -> ExportReport:
    """Export one podtrain checkpoint as an HF model folder, atomically: built in a sibling
    temporary folder and renamed, so an interrupted export leaves no half folder under ``out_dir``."""
    cfg = ModelConfig.model_validate(train_config["model"])
    try:
        dtype = _weights_dtype(weights_path)
    except Exception as exc:  # SafetensorError for a truncated or foreign file
        raise HFError(f"{weights_path}: unreadable weights ({' '.join(str(exc).split())[:200]})") from None
    hf_config = model_to_hf_config(cfg, dtype)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise HFError(f"{out_dir}: exists and is not empty (pass --overwrite to replace it)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{glob.escape(out_dir.name)}.*/{EXPORTING}"):  # a killed export's half folder
        shutil.rmtree(stale.parent, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / EXPORTING).touch()  # marks the folder as ours to remove, should this export be killed
        files, count, total = export_weights(weights_path, cfg, tmp, max_shard_bytes)
        described, special = export_tokenizer(tokenizer or train_config.get("tokenizer_path"), tmp)
        hf_config.update(special)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2))
        generation = {"do_sample": False, **special}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2))
        (tmp / EXPORTING).unlink()
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportReport(out_dir, hf_config["architectures"][0], sorted(p.name for p in out_dir.iterdir()), count, total, described)


def _weights_dtype(path: Path) -> str:
    """The dtype name HF's config records (``float32``...), from the first tensor's header entry."""
    with safetensors.safe_open(str(path), framework="pt") as fh:
        return str(TORCH_DTYPES[fh.get_slice(next(iter(fh.keys()))).get_dtype()]).removeprefix("torch.")


def check_export(out_dir: Path, model: torch.nn.Module, ids: list[int]) -> tuple[str, float]:
    """Load ``out_dir`` with ``transformers`` (model and tokenizer when present) and compare its logits on
    ``ids`` with podtrain's ``model``: (HF class name, max abs difference), both in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a one-line check: no "Loading weights" bar in the middle of a summary
    hf = AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32).eval()
    if (out_dir / "tokenizer_config.json").is_file():
        AutoTokenizer.from_pretrained(str(out_dir))
    x = torch.tensor([ids])
    with torch.no_grad():
        theirs = hf(x).logits
        ours, _ = model.float().eval()(x)
    return type(hf).__name__, float((theirs - ours).abs().max())
