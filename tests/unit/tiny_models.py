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
