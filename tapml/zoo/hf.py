"""Tiny random Hugging Face models: the transformers test-suite practice of small
configs with seeded weights, one per architecture family, built offline.

Only MiniLM has trained weights; these exist for breadth — every architecture's
operators, shapes and control flow — not for realistic activations.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .workload import Workload

V = 128  # vocabulary of every tiny text model
_DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_ENC = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)
_S2S = dict(vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, decoder_start_token_id=1)


@dataclass(frozen=True)
class Arch:
    config: str  # transformers config class
    model: str  # transformers model class
    kwargs: dict
    inputs: str  # "text", "seq2seq", "image", "audio"
    family: str
    generate: bool = False


ARCHS: dict[str, Arch] = {
    "gpt2": Arch("GPT2Config", "GPT2LMHeadModel", dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                                      n_positions=128, bos_token_id=1, eos_token_id=2),
                 "text", "decoder", True),
    "llama": Arch("LlamaConfig", "LlamaForCausalLM", _DEC, "text", "decoder", True),
    "mistral": Arch("MistralConfig", "MistralForCausalLM", _DEC, "text", "decoder", True),
    "qwen2": Arch("Qwen2Config", "Qwen2ForCausalLM", _DEC, "text", "decoder", True),
    "qwen3": Arch("Qwen3Config", "Qwen3ForCausalLM", dict(_DEC, head_dim=8), "text", "decoder", True),
    "phi3": Arch("Phi3Config", "Phi3ForCausalLM", _DEC, "text", "decoder", True),
    "gemma": Arch("GemmaConfig", "GemmaForCausalLM", dict(_DEC, head_dim=8), "text", "decoder", True),
    "gpt-neox": Arch("GPTNeoXConfig", "GPTNeoXForCausalLM",
                     dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=128, bos_token_id=1, eos_token_id=2),
                     "text", "decoder", True),
    "opt": Arch("OPTConfig", "OPTForCausalLM", dict(vocab_size=V, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                                    num_attention_heads=4, max_position_embeddings=128,
                                                    word_embed_proj_dim=32, pad_token_id=0, bos_token_id=1,
                                                    eos_token_id=2), "text", "decoder", True),
    "bloom": Arch("BloomConfig", "BloomForCausalLM", dict(vocab_size=V, hidden_size=32, n_layer=2, n_head=4,
                                                          bos_token_id=1, eos_token_id=2, pad_token_id=0),
                  "text", "decoder", True),
    "falcon": Arch("FalconConfig", "FalconForCausalLM", dict(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                             num_attention_heads=4, bos_token_id=1, eos_token_id=2),
                   "text", "decoder", True),
    "olmo": Arch("OlmoConfig", "OlmoForCausalLM", _DEC, "text", "decoder", True),
    "mixtral": Arch("MixtralConfig", "MixtralForCausalLM", dict(_DEC, num_local_experts=4, num_experts_per_tok=2),
                    "text", "mixture of experts", True),
    "bert": Arch("BertConfig", "BertModel", _ENC, "text", "encoder"),
    "roberta": Arch("RobertaConfig", "RobertaModel", _ENC, "text", "encoder"),
    "distilbert": Arch("DistilBertConfig", "DistilBertModel", dict(vocab_size=V, dim=32, n_layers=2, n_heads=4,
                                                                   hidden_dim=64), "text", "encoder"),
    "electra": Arch("ElectraConfig", "ElectraModel", dict(_ENC, embedding_size=32), "text", "encoder"),
    "t5": Arch("T5Config", "T5ForConditionalGeneration", dict(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                              num_heads=4, decoder_start_token_id=0),
               "seq2seq", "encoder-decoder"),
    "bart": Arch("BartConfig", "BartForConditionalGeneration", dict(_S2S, max_position_embeddings=128),
                 "seq2seq", "encoder-decoder"),
    "vit": Arch("ViTConfig", "ViTModel", dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                              num_attention_heads=4, intermediate_size=64), "image", "vision"),
    "convnext": Arch("ConvNextConfig", "ConvNextModel", dict(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1],
                                                             num_stages=2, image_size=32), "image", "vision"),
    "whisper": Arch("WhisperConfig", "WhisperForConditionalGeneration",
                    dict(_S2S, num_mel_bins=16, max_source_positions=32, max_target_positions=32),
                    "audio", "audio"),
    "mamba": Arch("MambaConfig", "MambaForCausalLM", dict(vocab_size=V, hidden_size=32, num_hidden_layers=2,
                                                          state_size=8, bos_token_id=1, eos_token_id=2, pad_token_id=0),
                  "text", "state space", True),
}


def _inputs(kind: str, g: torch.Generator) -> dict:
    tokens = lambda n: torch.randint(3, V, (1, n), generator=g)  # noqa: E731
    if kind == "text":
        return {"input_ids": tokens(8)}
    if kind == "seq2seq":
        return {"input_ids": tokens(8), "decoder_input_ids": tokens(4)}
    if kind == "image":
        return {"pixel_values": torch.randn(1, 3, 32, 32, generator=g)}
    return {"input_features": torch.randn(1, 16, 64, generator=g), "decoder_input_ids": tokens(4)}


def build(name: str) -> Workload:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    transformers.utils.logging.set_verbosity_error()
    arch = ARCHS[name]
    config = getattr(transformers, arch.config)(**arch.kwargs)
    config._attn_implementation = "eager"  # attention as separate ops, not one fused kernel
    torch.manual_seed(0)  # seeded random weights (HF initializes from the global generator)
    model = getattr(transformers, arch.model)(config).eval()
    inputs = _inputs(arch.inputs, torch.Generator().manual_seed(0))
    generate: Callable[[int], torch.Tensor] | None = None
    if arch.generate:
        def generate(n: int) -> torch.Tensor:
            return model.generate(inputs["input_ids"], max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                  pad_token_id=0)
    return Workload(model=model, inputs=inputs, name=f"zoo:{name}", generate=generate,
                    description=f"tiny random {name} ({arch.family}, 2 layers)")
