"""HF <-> rag_jax for ``RagSequenceForGeneration`` / ``RagTokenForGeneration``
directories: ``config.json`` with ``question_encoder`` and ``generator``
sub-configs, weights under ``rag.question_encoder.question_encoder.*`` and
``rag.generator.*``, tokenizers in ``question_encoder_tokenizer/`` and
``generator_tokenizer/``."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from rag_jax.hf import bart as hf_bart, bert as hf_bert, io as hf_io
from rag_jax.hf.io import CheckpointError
from rag_jax.models.bart import BartConfig
from rag_jax.models.bert import BertConfig
from rag_jax.rag.settings import RagSettings

QE_PREFIX = "rag.question_encoder.question_encoder.bert_model."
QE_PROJ_PREFIX = "rag.question_encoder.question_encoder.encode_proj."
GEN_PREFIX = "rag.generator."
QE_TOKENIZER_DIR = "question_encoder_tokenizer"
GEN_TOKENIZER_DIR = "generator_tokenizer"
VARIANT_OF_ARCH = {"RagSequenceForGeneration": "sequence", "RagTokenForGeneration": "token"}
ARCH_OF_VARIANT = {v: k for k, v in VARIANT_OF_ARCH.items()}


# RagSettings fields stored at the RAG level. Not ``variant`` (the
# architecture) nor ``prefix``: HF's retriever takes that from the generator's config.
_RAG_LEVEL = tuple(f.name for f in dataclasses.fields(RagSettings) if f.name not in ("variant", "prefix"))
_HANDLED = _RAG_LEVEL + (
    "question_encoder", "generator", "architectures", "model_type", "vocab_size", "is_encoder_decoder",
)
# Attributes about retrieval back-ends, output formatting or bookkeeping:
# they do not change any number rag_jax computes from given contexts.
_INERT = (
    "transformers_version", "output_hidden_states", "output_attentions", "return_dict", "dtype", "torch_dtype",
    "chunk_size_feed_forward", "id2label", "label2id", "problem_type", "retrieval_vector_size",
    "retrieval_batch_size", "dataset", "dataset_split", "index_name", "index_path", "passages_path",
    "use_dummy_dataset", "output_retrieved", "use_cache", "dataset_revision", "_name_or_path", "name_or_path",
    "tie_word_embeddings", "torchscript", "use_bfloat16", "pruned_heads", "tie_encoder_decoder", "is_decoder",
    "add_cross_attention", "tokenizer_class", "finetuning_task", "task_specific_params", "num_labels",
    "_attn_implementation_autoset", "_attn_implementation", "forced_eos_token_id", "forced_bos_token_id",
    "max_length", "min_length", "num_beams", "early_stopping", "length_penalty", "num_return_sequences",
    "sep_token_id", "tf_legacy_loss", "return_dict_in_generate", "output_scores",
    # transformers never reads the RAG-level prefix (its retriever uses the generator's).
    "prefix",
    # Only changes the logits HF's RAG-Token forward returns; rag_jax returns none.
    "do_marginalize",
)
# Attributes with a value rag_jax does not implement. The generation settings
# stored in old configs would change decoding if set; ``reduce_loss=True``
# makes HF sum the loss over the batch, in ``forward`` and inside RAG-Sequence
# ``generate``'s candidate scoring (``nll`` is per example); without
# ``do_deduplication`` HF scores duplicate RAG-Sequence hypotheses again.
_REQUIRED = {
    "no_repeat_ngram_size": [0, None], "repetition_penalty": [1.0, None], "do_sample": [False, None],
    "reduce_loss": [False, None], "do_deduplication": [True, None],
}


def settings_from_hf(hf: Mapping[str, Any], source: str) -> RagSettings:
    if hf.get("model_type", "rag") != "rag":
        raise CheckpointError(f"{source}: model_type={hf.get('model_type')!r}, expected 'rag'")
    hf_io.check_config_keys(hf, _HANDLED, _INERT + tuple(_REQUIRED), source)
    for key, allowed in _REQUIRED.items():
        hf_io.require_value(hf, key, allowed, source)
    if not hf.get("is_encoder_decoder", True):
        raise CheckpointError(f"{source}: is_encoder_decoder=False is not supported")
    archs = [a for a in (hf.get("architectures") or []) if a in VARIANT_OF_ARCH]
    kw = {k: hf[k] for k in _RAG_LEVEL if k in hf and hf[k] is not None}
    # Keep explicit None ids as None (HF falls back to the generator's ids).
    for key in ("bos_token_id", "pad_token_id", "eos_token_id", "decoder_start_token_id"):
        kw[key] = hf.get(key)
    gen = hf.get("generator")
    kw["prefix"] = gen.get("prefix") if isinstance(gen, Mapping) else None
    kw["variant"] = VARIANT_OF_ARCH[archs[0]] if archs else "sequence"
    return RagSettings(**kw)


def settings_to_hf(s: RagSettings) -> dict[str, Any]:
    """The RAG level of an HF config (the prefix belongs to the generator's: ``rag_to_hf``)."""
    out = {k: getattr(s, k) for k in _RAG_LEVEL}
    out.update(
        model_type="rag", architectures=[ARCH_OF_VARIANT[s.variant]], is_encoder_decoder=True, vocab_size=None,
        # Retrieval defaults HF expects to find; rag_jax does its own retrieval.
        retrieval_vector_size=768, retrieval_batch_size=8, dataset="wiki_dpr", dataset_split="train",
        index_name="compressed", index_path=None, passages_path=None, use_dummy_dataset=False,
        output_retrieved=False, use_cache=True, dataset_revision=None, dtype="float32",
    )
    return out


def load_rag_parts(
    path: str | os.PathLike, dtype: Any = None
) -> tuple[RagSettings, BertConfig | None, BartConfig, dict[str, Any]]:
    """-> (settings, question encoder config or None, generator config, params)."""
    hf = hf_io.read_config(path)
    source = f"{path}/config.json"
    settings = settings_from_hf(hf, source)
    if not isinstance(hf.get("generator"), Mapping):
        raise CheckpointError(f"{source}: no 'generator' sub-config")
    over = {} if dtype is None else {"dtype": dtype}
    gen_cfg = hf_bart.config_from_hf(hf["generator"], f"{source}[generator]", **over)
    qe_cfg = None
    if isinstance(hf.get("question_encoder"), Mapping):
        qe_cfg = hf_bert.config_from_hf(hf["question_encoder"], f"{source}[question_encoder]", **over)

    state = hf_io.load_state_dict(path)
    wsource = hf_io.weights_file(path)
    stray = [k for k in state if not (k.startswith(GEN_PREFIX) or k.startswith("rag.question_encoder."))]
    if stray:
        raise CheckpointError(f"{wsource}: {len(stray)} weight(s) outside rag.generator./rag.question_encoder.: {stray[:5]}")
    params: dict[str, Any] = {"generator": hf_bart.import_bart(state, gen_cfg, wsource, prefix=GEN_PREFIX)}
    qe_state = {k: v for k, v in state.items() if k.startswith("rag.question_encoder.")}
    if qe_state:
        if qe_cfg is None:
            raise CheckpointError(f"{wsource}: question encoder weights but no question_encoder sub-config")
        flat = hf_io.import_params(
            qe_state, hf_bert.bert_rules(qe_cfg.num_hidden_layers, QE_PREFIX, QE_PROJ_PREFIX),
            hf_bert.param_shapes(qe_cfg), wsource, ignore=hf_bert._IGNORE,
        )
        params["question_encoder"] = hf_io.unflatten_params(flat)
    else:
        qe_cfg = None
    return settings, qe_cfg, gen_cfg, params


def rag_to_hf(
    settings: RagSettings, qe_config: BertConfig | None, gen_config: BartConfig, params: Mapping[str, Any]
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(HF state dict, HF config dict) of a RAG directory."""
    state, gen_hf = hf_bart.bart_to_hf(gen_config, params["generator"], prefix=GEN_PREFIX)
    config = settings_to_hf(settings)
    if settings.prefix is not None:
        gen_hf["prefix"] = settings.prefix
    config["generator"] = gen_hf
    if qe_config is not None and "question_encoder" in params:
        qe_state, qe_hf = hf_bert.dpr_to_hf(qe_config, params["question_encoder"], "question")
        state.update({"rag.question_encoder." + k: v for k, v in qe_state.items()})
        config["question_encoder"] = qe_hf
    return state, config
