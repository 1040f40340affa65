"""Tiny random models shared by the unit tests (imported by test files; not a test module)."""
import torch


def tiny_llm(tokenizer, seed=0):
    """A 2-layer Llama with SmolLM2's vocabulary: real tokenizer, random weights, milliseconds per step."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def scramble_adaln(model, std=0.3):
    """Make every AdaLN's scale/shift layer non-zero (they start at zero, the identity) so that emotion matters."""
    from emo_lib.decoder import AdaLN

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, AdaLN):
                module.to_scale_shift.weight.normal_(0, std)
    return model


def tiny_decoder_config(hidden_dim, emotion_dim, **overrides):
    """A 2-block durations-decoder ``Stage2Config`` (dim 16, 10 units, 5 pitch and 3 energy bins, 64 frames)."""
    from emo_lib.decoder import Stage2Config

    values = dict(hidden_dim=hidden_dim, emotion_dim=emotion_dim, dim=16, layers=2, heads=2, n_units=10,
                  pitch_bins=5, energy_bins=3, max_frames=64, lookahead_tokens=1, max_token_frames=8,
                  duration_layers=1, dropout=0.0)
    values.update(overrides)
    return Stage2Config(**values)


def tiny_speech_decoder(hidden_dim, emotion_dim, seed=0, scramble=True, **overrides):
    """A random ``SpeechDecoder`` of ``tiny_decoder_config``'s sizes, AdaLN scrambled unless told, in eval mode."""
    from emo_lib.decoder import SpeechDecoder

    config = tiny_decoder_config(hidden_dim, emotion_dim, **overrides)
    torch.manual_seed(seed)
    model = SpeechDecoder(config)
    if scramble:
        scramble_adaln(model)
    return model.eval()
