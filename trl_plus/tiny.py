"""Tiny, locally built models and tokenizers for tests, benchmarks and the CPU demo (no downloads).

>>> tokenizer = build_char_tokenizer()
>>> tokenizer.decode(tokenizer("12+3=")["input_ids"])
'12+3='
"""

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

DEFAULT_ALPHABET = string.digits + string.ascii_lowercase + " +-*=?.,:"
PAD, EOS, UNK = "<pad>", "<eos>", "<unk>"


def build_char_tokenizer(alphabet: str = DEFAULT_ALPHABET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, with `<pad>` distinct from `<eos>`."""
    vocab = {token: index for index, token in enumerate([PAD, EOS, UNK, *alphabet])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # WordLevel would otherwise join characters with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, eos_token=EOS, unk_token=UNK)


def build_tiny_model(
    tokenizer: PreTrainedTokenizerFast, hidden_size: int = 64, num_layers: int = 2, seed: int = 0, **config_overrides
) -> Qwen2ForCausalLM:
    """A randomly initialized Qwen2 causal LM sized for a CPU, with eos and pad set for generation.

    `config_overrides` replace `Qwen2Config` fields of the small default shape (e.g. `num_attention_heads=14` for a
    real model's shape, or `vocab_size=151936` for its logits: ids past the tokenizer's decode to nothing).

    >>> build_tiny_model(build_char_tokenizer(), max_position_embeddings=512).config.max_position_embeddings
    512
    """
    import torch

    torch.manual_seed(seed)
    shape = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    config = Qwen2Config(
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **{**shape, **config_overrides},
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model(path: str, **model_kwargs) -> str:
    """Build a tiny model and its tokenizer and save both to `path`, so trainers can load them by name."""
    tokenizer = build_char_tokenizer()
    build_tiny_model(tokenizer, **model_kwargs).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
