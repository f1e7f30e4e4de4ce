"""``rag_jax.load_encoder``: a DPR question/context tower with its tokenizer."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rag_jax.hf import bert as hf_bert, io as hf_io
from rag_jax.data.tokenize import TextTokenizer, maybe_load_tokenizer, stage_tokenizer_files
from rag_jax.models.bert import BertConfig, DprEncoder


def encode_fn(config: BertConfig):  # noqa: ANN201 - returns a pure function
    """Pure ``(params, input_ids, attention_mask, token_type_ids) -> [B, D]``."""
    model = DprEncoder(config)

    def apply(params: Any, input_ids: jax.Array, attention_mask: jax.Array, token_type_ids: jax.Array | None = None):
        return model.apply({"params": params}, input_ids, attention_mask, token_type_ids)

    return apply


class Encoder:
    """A DPR tower: ``.encode(input_ids, attention_mask) -> [B, D]`` over pure ``apply_fn``."""

    def __init__(
        self, config: BertConfig, params: Any, kind: str = "question", tokenizer: TextTokenizer | None = None
    ) -> None:
        self.config = config
        self.params = params
        self.kind = kind
        self.tokenizer = tokenizer
        self.model = DprEncoder(config)
        self.apply_fn = encode_fn(config)
        self._jitted = jax.jit(self.apply_fn)
        self._fingerprint: str | None = None

    def encode(
        self, input_ids: Any, attention_mask: Any = None, token_type_ids: Any = None
    ) -> jax.Array:
        input_ids = jnp.asarray(input_ids, jnp.int32)
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        return self._jitted(self.params, input_ids, jnp.asarray(attention_mask, jnp.int32), token_type_ids)

    def encode_texts(
        self, texts: Sequence[str], titles: Sequence[str] | None = None, max_length: int = 256, batch_size: int = 64
    ) -> np.ndarray:
        """Tokenizes and encodes; ``titles`` makes DPR context pairs ``[CLS] title [SEP] text [SEP]``."""
        if self.tokenizer is None:
            raise ValueError("this encoder was loaded without tokenizer files (vocab.txt / tokenizer.json)")
        out = []
        for start in range(0, len(texts), batch_size):
            chunk = list(texts[start : start + batch_size])
            n = len(chunk)
            pad = batch_size - n if len(texts) > batch_size else 0  # fixed shapes: one compile
            chunk = chunk + [""] * pad
            if titles is not None:
                t_chunk = list(titles[start : start + batch_size]) + [""] * pad
                batch = self.tokenizer(t_chunk, chunk, max_length=max_length)
            else:
                batch = self.tokenizer(chunk, max_length=max_length)
            emb = self.encode(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
            out.append(np.asarray(emb)[:n])
        if not out:
            return np.zeros((0, self.config.output_dim), np.float32)
        return np.concatenate(out, axis=0)

    @property
    def dim(self) -> int:
        return self.config.output_dim

    def fingerprint(self) -> str:
        """sha256 over config and parameter bytes: ties an index to its encoder."""
        if self._fingerprint is None:
            cfg = hf_bert.config_to_hf(self.config, "question")
            h = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
            for key, value in sorted(hf_io.flatten_params(self.params).items()):
                h.update(key.encode())
                h.update(np.ascontiguousarray(np.asarray(jax.device_get(value), np.float32)).tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def save_hf(self, path: str | os.PathLike, kind: str | None = None) -> None:
        """Writes an HF directory (``DPRQuestionEncoder``/``DPRContextEncoder``/``BertModel``)."""
        kind = kind or self.kind
        state, hf_config = hf_bert.dpr_to_hf(self.config, self.params, kind)
        with tempfile.TemporaryDirectory() as tok_dir:
            hf_io.write_hf_dir(path, state, hf_config, stage_tokenizer_files(self.tokenizer, tok_dir))


def load_encoder(path: str | os.PathLike, dtype: Any = jnp.float32) -> Encoder:
    """Loads ``DPRQuestionEncoder``, ``DPRContextEncoder`` or plain ``BertModel`` from ``path``."""
    config, params, kind = hf_bert.load_dpr(path, dtype=dtype)
    params = jax.tree.map(jnp.asarray, params)
    return Encoder(config, params, kind if kind != "bert" else "question", maybe_load_tokenizer(path, "bert"))


