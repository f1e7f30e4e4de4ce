"""``rag_jax.load_generator``: a BART generator with its tokenizer."""
from __future__ import annotations

import os
import tempfile
from typing import Any

import jax
import jax.numpy as jnp

from rag_jax.hf import bart as hf_bart, io as hf_io
from rag_jax.data.tokenize import TextTokenizer, maybe_load_tokenizer, stage_tokenizer_files
from rag_jax.models.bart import Bart, BartConfig, init_params, with_sinusoidal_positions


def logits_fn(config: BartConfig):  # noqa: ANN201 - returns a pure function
    """Pure ``(params, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask) -> [B, T, V]``."""
    model = Bart(config)

    def apply(params: Any, input_ids: jax.Array, attention_mask: jax.Array, decoder_input_ids: jax.Array,
              decoder_attention_mask: jax.Array | None = None) -> jax.Array:
        return model.apply({"params": params}, input_ids, attention_mask, decoder_input_ids, decoder_attention_mask)

    return apply


def scratch_generator(fields: dict[str, Any], tokenizer: TextTokenizer, rng: jax.Array,
                      sinusoidal_positions: float = 0.0, **overrides: Any) -> tuple[BartConfig, Any]:
    """A from-scratch BART (``fields``: BartConfig shape fields; ``overrides``:
    more BartConfig fields such as dtype or dropout) with the vocabulary and
    special tokens of ``tokenizer``, and its freshly initialised params.

    RAG feeds ``<s> answer </s>`` as decoder inputs (HF finetune_rag), so a
    generator that never saw BART pretraining starts decoding at ``<s>`` too:
    generation then sees exactly the positions and tokens of training (BART's
    ``</s>`` start would be a never-seen input). ``sinusoidal_positions > 0``
    starts both position tables as sin/cos times that scale."""
    cfg = BartConfig(
        **{**fields, "vocab_size": tokenizer.vocab_size, **overrides},
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.bos_token_id,
        forced_eos_token_id=tokenizer.eos_token_id,
    )
    params = init_params(cfg, rng)
    if sinusoidal_positions > 0:
        params = with_sinusoidal_positions(params, sinusoidal_positions)
    return cfg, params


class Generator:
    """BART: ``.logits(...)`` over the pure ``apply_fn``; ``.save_hf`` exports."""

    def __init__(self, config: BartConfig, params: Any, tokenizer: TextTokenizer | None = None) -> None:
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.model = Bart(config)
        self.apply_fn = logits_fn(config)
        self._jitted = jax.jit(self.apply_fn)

    def logits(self, input_ids: Any, attention_mask: Any, decoder_input_ids: Any,
               decoder_attention_mask: Any = None) -> jax.Array:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).astype(jnp.int32)
        return self._jitted(
            self.params, input_ids, jnp.asarray(attention_mask, jnp.int32),
            jnp.asarray(decoder_input_ids, jnp.int32), decoder_attention_mask,
        )

    def save_hf(self, path: str | os.PathLike) -> None:
        """Writes an HF ``BartForConditionalGeneration`` directory (plus the
        tokenizer files, if there is a tokenizer)."""
        state, hf_config = hf_bart.bart_to_hf(self.config, self.params)
        with tempfile.TemporaryDirectory() as tok_dir:
            hf_io.write_hf_dir(path, state, hf_config, stage_tokenizer_files(self.tokenizer, tok_dir))


def load_generator(path: str | os.PathLike, dtype: Any = jnp.float32) -> Generator:
    """Loads an HF ``BartForConditionalGeneration`` directory."""
    config, params = hf_bart.load_bart(path, dtype=dtype)
    params = jax.tree.map(jnp.asarray, params)
    return Generator(config, params, maybe_load_tokenizer(path, "bart"))
