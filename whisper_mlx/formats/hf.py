"""Hugging Face transformers Whisper checkpoints (WhisperForConditionalGeneration / WhisperModel):
config.json + model.safetensors (or a sharded model.safetensors.index.json, or pytorch_model.bin),
alignment heads in generation_config.json.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from ..dims import ModelDimensions, sinusoids
from ..errors import ModelFormatError
from . import Checkpoint
from .mlx import dequantize_checkpoint, read_json
from .safetensors import read_safetensors, write_safetensors

HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

_CONFIG_KEYS = {  # ModelDimensions field -> transformers WhisperConfig key
    "n_mels": "num_mel_bins",
    "n_audio_ctx": "max_source_positions",
    "n_audio_state": "d_model",
    "n_audio_head": "encoder_attention_heads",
    "n_audio_layer": "encoder_layers",
    "n_vocab": "vocab_size",
    "n_text_ctx": "max_target_positions",
    "n_text_state": "d_model",
    "n_text_head": "decoder_attention_heads",
    "n_text_layer": "decoder_layers",
}

# Per-layer names (after "model.{encoder,decoder}.layers.N.") -> mlx-whisper names (after "blocks.N.")
_LAYER_NAMES = {
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "encoder_attn.q_proj": "cross_attn.query",
    "encoder_attn.k_proj": "cross_attn.key",
    "encoder_attn.v_proj": "cross_attn.value",
    "encoder_attn.out_proj": "cross_attn.out",
    "encoder_attn_layer_norm": "cross_attn_ln",
    "fc1": "mlp1",
    "fc2": "mlp2",
    "final_layer_norm": "mlp_ln",
}
_TOP_NAMES = {
    "encoder.conv1": "encoder.conv1",
    "encoder.conv2": "encoder.conv2",
    "encoder.layer_norm": "encoder.ln_post",
    "decoder.embed_tokens": "decoder.token_embedding",
    "decoder.layer_norm": "decoder.ln",
}
_LAYER = re.compile(r"(encoder|decoder)\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_SKIPPED = ("encoder.embed_positions.weight", "proj_out.weight")  # computed / tied to embed_tokens


def _hf_to_mlx_name(name: str) -> str | None:
    name = name.removeprefix("model.")
    if name in _SKIPPED:
        return None
    if name == "decoder.embed_positions.weight":
        return "decoder.positional_embedding"
    match = _LAYER.match(name)
    if match:
        stack, index, module, kind = match.groups()
        if module not in _LAYER_NAMES:
            raise ModelFormatError(f"unknown transformers Whisper weight {name!r}")
        return f"{stack}.blocks.{index}.{_LAYER_NAMES[module]}.{kind}"
    module, _, kind = name.rpartition(".")
    if module not in _TOP_NAMES:
        raise ModelFormatError(f"unknown transformers Whisper weight {name!r}")
    return f"{_TOP_NAMES[module]}.{kind}"


def hf_to_mlx_weights(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in tensors.items():
        target = _hf_to_mlx_name(name)
        if target is None:
            continue
        if target in ("encoder.conv1.weight", "encoder.conv2.weight"):
            value = value.transpose(0, 2, 1)  # (out, in, kernel) -> (out, kernel, in)
        out[target] = value
    return out


def _read_hf_tensors(model_dir: Path) -> dict[str, np.ndarray]:
    if (model_dir / "model.safetensors").exists():
        return read_safetensors(model_dir / "model.safetensors")
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        shards = sorted(set(read_json(index_path).get("weight_map", {}).values()))
        if not shards:
            raise ModelFormatError(f"{index_path}: empty weight_map")
        tensors = {}
        for shard in shards:
            if not (model_dir / shard).exists():
                raise ModelFormatError(f"{model_dir / shard}: shard listed in {index_path.name} is missing")
            tensors.update(read_safetensors(model_dir / shard))
        return tensors
    from .openai_pt import read_torch_zip

    state = read_torch_zip(model_dir / "pytorch_model.bin")
    if not isinstance(state, dict):
        raise ModelFormatError(f"{model_dir / 'pytorch_model.bin'}: not a state dict")
    return dict(state)


def hf_dims(config: dict, path: Path) -> ModelDimensions:
    missing = sorted({key for key in _CONFIG_KEYS.values() if key not in config})
    if missing:
        raise ModelFormatError(f"{path}: not a transformers Whisper config (lacks {', '.join(missing)})")
    return ModelDimensions(**{field: int(config[key]) for field, key in _CONFIG_KEYS.items()})


def read_hf_checkpoint(model_dir: str | Path) -> Checkpoint:
    """A transformers Whisper directory as a Checkpoint (proj_out is tied to the token embedding)."""
    model_dir = Path(model_dir)
    dims = hf_dims(read_json(model_dir / "config.json"), model_dir / "config.json")
    weights = hf_to_mlx_weights(_read_hf_tensors(model_dir))
    heads = None
    generation_config = model_dir / "generation_config.json"
    if generation_config.exists():
        heads = read_json(generation_config).get("alignment_heads")
    return Checkpoint(
        dims,
        weights,
        None if heads is None else np.asarray(heads, dtype=np.int64).reshape(-1, 2),
        source_format="transformers",
    )


def _hf_weights(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    reverse_layer = {v: k for k, v in _LAYER_NAMES.items()}
    reverse_top = {v: k for k, v in _TOP_NAMES.items()}
    out = {}
    for name, value in weights.items():
        if name == "decoder.positional_embedding":
            out["model.decoder.embed_positions.weight"] = value
            continue
        match = re.match(r"(encoder|decoder)\.blocks\.(\d+)\.(.+)\.(weight|bias)$", name)
        if match:
            stack, index, module, kind = match.groups()
            out[f"model.{stack}.layers.{index}.{reverse_layer[module]}.{kind}"] = value
            continue
        module, _, kind = name.rpartition(".")
        if module in ("encoder.conv1", "encoder.conv2") and kind == "weight":
            value = value.transpose(0, 2, 1)
        out[f"model.{reverse_top[module]}.{kind}"] = value
    return out


def hf_config(dims: ModelDimensions, dtype: str) -> dict:
    if dims.n_audio_state != dims.n_text_state:
        raise ValueError("transformers Whisper needs equal encoder and decoder widths")
    eot = 50256 + int(dims.n_vocab >= 51865)  # multilingual vocabularies have one more token before <|endoftext|>
    config: dict[str, Any] = {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper"}
    config.update({key: getattr(dims, field) for field, key in _CONFIG_KEYS.items()})
    config.update(
        {
            "encoder_ffn_dim": 4 * dims.n_audio_state,
            "decoder_ffn_dim": 4 * dims.n_text_state,
            "activation_function": "gelu",
            "scale_embedding": False,
            "tie_word_embeddings": True,
            "bos_token_id": eot,
            "eos_token_id": eot,
            "pad_token_id": eot,
            "decoder_start_token_id": eot + 1,
            "torch_dtype": dtype,
        }
    )
    return config


def write_hf_checkpoint(checkpoint: Checkpoint, out_dir: str | Path) -> Path:
    """Write config.json, model.safetensors and (with alignment heads) generation_config.json."""
    checkpoint = dequantize_checkpoint(checkpoint)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = _hf_weights(checkpoint.weights)
    dtype = tensors["model.encoder.layer_norm.weight"].dtype
    dims = checkpoint.dims
    positions = sinusoids(dims.n_audio_ctx, dims.n_audio_state)
    tensors["model.encoder.embed_positions.weight"] = positions.astype(dtype)  # transformers stores it
    write_safetensors(tensors, out_dir / "model.safetensors", {"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(dims, str(dtype)), indent=2) + "\n")
    if checkpoint.alignment_heads is not None:
        heads = np.asarray(checkpoint.alignment_heads).reshape(-1, 2).tolist()
        (out_dir / "generation_config.json").write_text(json.dumps({"alignment_heads": heads}, indent=2) + "\n")
    return out_dir
