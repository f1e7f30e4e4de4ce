"""Classification as single-token generation, the paper's FEVER recipe
(section 3.4): "we map each class label to a single output token and train
directly using claim-class pairs", with no supervision on evidence.

* Training needs nothing new: the target of a claim is its label's word,
  tokenized as any answer (``<s> word </s>``, HF finetune_rag), and the loss
  is the usual RAG marginal NLL. The ``</s>`` step stays in the target on
  purpose: RAG-Sequence adds the document prior at target step 1 (HF's
  ``get_nll``), so a one-step target would train the retriever with no
  gradient at all.
* Prediction is the arg-max over the label tokens only, of the RAG marginal
  ``log sum_z p(z|x) p(label|x, z, <s>)`` at the first decoder step. At a
  single step RAG-Sequence and RAG-Token define the same distribution (a
  one-token sequence's probability is its token's), so one function serves
  both variants.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rag_jax.models.bart import BartConfig
from rag_jax.rag.marginals import token_log_marginal
from rag_jax.rag.model import doc_logits


@dataclasses.dataclass(frozen=True)
class LabelSpace:
    """The classes, the generator word each is trained as, and that word's token."""

    labels: tuple[str, ...]
    words: tuple[str, ...]
    token_ids: tuple[int, ...]
    # The decoder input at the label's step: the first token of every
    # tokenized target (``<s>``), i.e. what training feeds there.
    start_token_id: int

    def target_texts(self, answers: Sequence[str]) -> list[str]:
        """Label strings -> the words the generator is trained to produce."""
        word = dict(zip(self.labels, self.words))
        missing = [a for a in answers if a not in word]
        if missing:
            raise ValueError(f"label {missing[0]!r} is not one of config.task.labels {self.labels}")
        return [word[a] for a in answers]

    def names(self, indices: Sequence[int] | np.ndarray) -> list[str]:
        return [self.labels[int(i)] for i in np.asarray(indices).reshape(-1)]


def label_space(labels: Sequence[str], words: Sequence[str], tokenizer: Any) -> LabelSpace:
    """Maps each label to one generator token; a word that is not exactly one
    token (between ``<s>`` and ``</s>``) is a one-line error naming the label
    and its tokenization. ``words`` empty: the labels are their own words."""
    labels = tuple(labels)
    words = tuple(words) or labels
    if len(words) != len(labels):
        raise ValueError(f"config.task.label_words: {len(words)} words for {len(labels)} labels")
    field = "config.task.label_words" if words != labels else "config.task.labels"
    ids, starts = [], set()
    for label, word in zip(labels, words):
        enc = tokenizer([word], max_length=64, pad_to_max=False)["input_ids"][0].tolist()
        body = enc[1:-1] if enc[:1] == [tokenizer.bos_token_id] and enc[-1:] == [tokenizer.eos_token_id] else enc
        if len(body) != 1 or body[0] == tokenizer.unk_token_id:
            pieces = [tokenizer.tok.id_to_token(i) for i in body]
            raise ValueError(f"{field}: label {label!r} (word {word!r}) is {len(body)} generator tokens {pieces}, "
                             "not one: set config.task.label_words to words the generator tokenizer keeps whole")
        ids.append(body[0])
        starts.add(enc[0])
    if len(set(ids)) != len(ids):
        raise ValueError(f"{field}: two labels share one generator token ({dict(zip(labels, ids))})")
    if len(starts) != 1:
        raise ValueError(f"{field}: the tokenized labels start with different tokens {sorted(starts)}")
    return LabelSpace(labels, words, tuple(ids), starts.pop())


def label_log_probs(gen_config: BartConfig, gen_params: Any, context_input_ids: jax.Array,
                    context_attention_mask: jax.Array, doc_scores: jax.Array, start_token_id: jax.Array,
                    label_token_ids: jax.Array) -> jax.Array:
    """``[B, C]`` RAG-marginal log-probabilities of the ``C`` label tokens at
    the first decoder step (contexts ``[B, K, L]``, scores ``[B, K]``)."""
    b = context_input_ids.shape[0]
    dec = jnp.broadcast_to(jnp.asarray(start_token_id, jnp.int32), (b, 1))
    logits = doc_logits(gen_config, gen_params, context_input_ids, context_attention_mask, dec)  # [B, K, 1, V]
    marginal = token_log_marginal(logits, doc_scores)[:, 0]  # [B, V]
    return marginal[:, jnp.asarray(label_token_ids, jnp.int32)]


@functools.lru_cache(maxsize=None)
def label_scorer(gen_config: BartConfig) -> Callable[..., jax.Array]:
    """Jitted :func:`label_log_probs` for one generator config (compiled once per shape)."""
    return jax.jit(functools.partial(label_log_probs, gen_config))


def predict_labels(gen_config: BartConfig, gen_params: Any, context_input_ids: Any, context_attention_mask: Any,
                   doc_scores: Any, space: LabelSpace) -> np.ndarray:
    """Index into ``space.labels`` of each example's arg-max label ``[B]``."""
    lp = label_scorer(gen_config)(gen_params, jnp.asarray(context_input_ids, jnp.int32),
                                  jnp.asarray(context_attention_mask, jnp.int32),
                                  jnp.asarray(doc_scores, jnp.float32), jnp.int32(space.start_token_id),
                                  jnp.asarray(space.token_ids, jnp.int32))
    return np.asarray(jnp.argmax(lp, axis=-1))
