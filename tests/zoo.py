"""Tiny random-weight configurations of Hugging Face model families (built from config objects,
nothing downloaded), wrapped to return logits the way ``nn.CrossEntropyLoss`` reads them.

Only imported by ``test_zoo.py`` after ``pytest.importorskip("transformers")``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import transformers as tf
from torch import Tensor, nn

VOCAB, WIDTH, N, T = 13, 8, 3, 3  # N == T: the coincidence a length test gets wrong

tf.logging.set_verbosity_error()


class CausalLogits(nn.Module):
    """A causal LM (GPT-2, Llama) with its default arguments: logits ``[N, V, T]``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids).logits.transpose(1, 2)


class Seq2SeqLogits(CausalLogits):
    """An encoder-decoder (T5) reading ``ids`` on both sides: logits ``[N, V, T]``."""

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids, decoder_input_ids=ids).logits.transpose(1, 2)


class ClassLogits(CausalLogits):
    """A sequence classifier (BERT): logits ``[N, classes]``."""

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids).logits


def gpt2() -> nn.Module:
    config = tf.GPT2Config(
        vocab_size=VOCAB,
        n_positions=8,
        n_embd=WIDTH,
        n_layer=1,
        n_head=2,
        bos_token_id=0,
        eos_token_id=0,
    )
    return CausalLogits(tf.GPT2LMHeadModel(config))


def bert() -> nn.Module:
    config = tf.BertConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=12,
        max_position_embeddings=8,
        num_labels=3,
    )
    return ClassLogits(tf.BertForSequenceClassification(config))


def llama() -> nn.Module:
    config = tf.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=WIDTH,
        intermediate_size=12,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=8,
    )
    return CausalLogits(tf.LlamaForCausalLM(config))


def t5() -> nn.Module:
    config = tf.T5Config(
        vocab_size=VOCAB,
        d_model=WIDTH,
        d_kv=4,
        d_ff=12,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        relative_attention_num_buckets=4,
        relative_attention_max_distance=8,
    )
    return Seq2SeqLogits(tf.T5ForConditionalGeneration(config))


MODELS: dict[str, Callable[[], nn.Module]] = {
    "gpt2": gpt2,
    "bert": bert,
    "llama": llama,
    "t5": t5,
}

# Llama's RMSNorm and T5's LayerNorm compute their statistics in float32 even in a float64
# model: two exact computations that order those float32 operations differently agree to ~1e-8
FLOAT32_INSIDE = {"llama", "t5"}


def case(name: str, seed: int = 0) -> tuple[nn.Module, Tensor, Tensor, nn.Module]:
    """``(model in float64 eval mode, input ids [N, T], targets, loss)``."""
    torch.manual_seed(seed)
    # Initialize in float32 whatever the default dtype (some test modules set float64 at import,
    # which changes the draws): the same model whichever tests run before.
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        model = MODELS[name]().double().eval()
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, VOCAB, (N, T), generator=g)
    shape = (N,) if name == "bert" else (N, T)
    y = torch.randint(0, 3 if name == "bert" else VOCAB, shape, generator=g)
    return model, ids, y, nn.CrossEntropyLoss()
