"""HF <-> rag_jax for DPR towers: ``DPRQuestionEncoder``, ``DPRContextEncoder``
and plain ``BertModel`` directories (a BERT used as a DPR tower)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import linen as nn

from rag_jax.hf import io as hf_io
from rag_jax.hf.io import CheckpointError, Rule
from rag_jax.models.bert import BertConfig, DprEncoder

# Config attributes that are read into BertConfig.
_HANDLED = (
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "hidden_act", "layer_norm_eps", "max_position_embeddings", "type_vocab_size", "projection_dim",
    "hidden_dropout_prob", "attention_probs_dropout_prob", "initializer_range", "pad_token_id",
    "position_embedding_type", "is_decoder", "add_cross_attention",
)
# Attributes that do not change the encoder's forward pass.
_INERT = (
    "architectures", "model_type", "transformers_version", "dtype", "torch_dtype", "_name_or_path",
    "name_or_path", "bos_token_id", "eos_token_id", "sep_token_id", "use_cache", "classifier_dropout",
    "gradient_checkpointing", "tie_word_embeddings", "output_attentions", "output_hidden_states",
    "return_dict", "id2label", "label2id", "problem_type", "chunk_size_feed_forward", "pruned_heads",
    "torchscript", "use_bfloat16", "tf_legacy_loss", "finetuning_task", "tokenizer_class", "prefix",
    "task_specific_params", "decoder_start_token_id", "is_encoder_decoder", "cross_attention_hidden_size",
    "directionality", "pooler_fc_size", "pooler_num_attention_heads", "pooler_num_fc_layers",
    "pooler_size_per_head", "pooler_type", "_attn_implementation_autoset", "_attn_implementation",
    "layer_types", "num_labels",
)
# BertConfig fields that are ours (how to compute), not HF attributes.
_OURS = ("dtype", "param_dtype", "precision", "remat")
# Keys carrying nothing the DPR tower uses: HF buffers, the BERT pooler (DPR
# reads [CLS] directly), and pre-training heads of BertFor* checkpoints.
_IGNORE = (r"position_ids$", r"(^|\.)pooler\.", r"^cls\.")

KINDS = ("question", "context", "bert")
_PREFIX = {
    "question": ("question_encoder.bert_model.", "question_encoder.encode_proj."),
    "context": ("ctx_encoder.bert_model.", "ctx_encoder.encode_proj."),
    "bert": ("", "encode_proj."),
}


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json", **overrides: Any) -> BertConfig:
    hf_io.check_config_keys(hf, _HANDLED, _INERT, source)
    hf_io.require_value(hf, "position_embedding_type", ["absolute"], source)
    hf_io.require_value(hf, "is_decoder", [False], source)
    hf_io.require_value(hf, "add_cross_attention", [False], source)
    kwargs = {
        f.name: hf[f.name]
        for f in dataclasses.fields(BertConfig)
        if f.name in hf and f.name not in _OURS
    }
    if kwargs.get("projection_dim") is None:
        kwargs["projection_dim"] = 0
    if kwargs.get("pad_token_id") is None:
        kwargs["pad_token_id"] = 0
    kwargs.update(overrides)
    try:
        return BertConfig(**kwargs)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def config_to_hf(config: BertConfig, kind: str) -> dict[str, Any]:
    out = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size,
        "hidden_act": config.hidden_act,
        "layer_norm_eps": config.layer_norm_eps,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size,
        "hidden_dropout_prob": config.hidden_dropout_prob,
        "attention_probs_dropout_prob": config.attention_probs_dropout_prob,
        "initializer_range": config.initializer_range,
        "pad_token_id": config.pad_token_id,
        "position_embedding_type": "absolute",
        "dtype": "float32",
    }
    if kind == "bert":
        if config.projection_dim:
            raise CheckpointError("a BertModel directory cannot hold encode_proj; export as 'question' or 'context'")
        out.update(model_type="bert", architectures=["BertModel"])
    else:
        out.update(
            model_type="dpr",
            projection_dim=config.projection_dim,
            architectures=["DPRQuestionEncoder" if kind == "question" else "DPRContextEncoder"],
        )
    return out


def bert_rules(num_layers: int, prefix: str = "", proj_prefix: str = "encode_proj.") -> list[Rule]:
    """The declarative key map of one BERT tower (``{i}`` = layer index)."""
    p, lp = prefix, f"{prefix}encoder.layer.{{i}}."
    rules = [
        Rule(f"{p}embeddings.word_embeddings.weight", "word_embeddings/embedding"),
        Rule(f"{p}embeddings.position_embeddings.weight", "position_embeddings/embedding"),
        Rule(f"{p}embeddings.token_type_embeddings.weight", "token_type_embeddings/embedding"),
        Rule(f"{p}embeddings.LayerNorm.weight", "embeddings_ln/scale"),
        Rule(f"{p}embeddings.LayerNorm.bias", "embeddings_ln/bias"),
        Rule(f"{proj_prefix}weight", "encode_proj/kernel", "linear"),
        Rule(f"{proj_prefix}bias", "encode_proj/bias"),
    ]
    for name in ("query", "key", "value"):
        rules += [
            Rule(f"{lp}attention.self.{name}.weight", f"layer_{{i}}/attention/{name}/kernel", "linear"),
            Rule(f"{lp}attention.self.{name}.bias", f"layer_{{i}}/attention/{name}/bias"),
        ]
    rules += [
        Rule(f"{lp}attention.output.dense.weight", "layer_{i}/attention/out/kernel", "linear", in_dims=2),
        Rule(f"{lp}attention.output.dense.bias", "layer_{i}/attention/out/bias"),
        Rule(f"{lp}attention.output.LayerNorm.weight", "layer_{i}/attention_ln/scale"),
        Rule(f"{lp}attention.output.LayerNorm.bias", "layer_{i}/attention_ln/bias"),
        Rule(f"{lp}intermediate.dense.weight", "layer_{i}/intermediate/kernel", "linear"),
        Rule(f"{lp}intermediate.dense.bias", "layer_{i}/intermediate/bias"),
        Rule(f"{lp}output.dense.weight", "layer_{i}/output/kernel", "linear"),
        Rule(f"{lp}output.dense.bias", "layer_{i}/output/bias"),
        Rule(f"{lp}output.LayerNorm.weight", "layer_{i}/output_ln/scale"),
        Rule(f"{lp}output.LayerNorm.bias", "layer_{i}/output_ln/bias"),
    ]
    # Legacy TF-converted BERT names its LayerNorm parameters gamma/beta.
    rules += [
        Rule(r.hf.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"), r.flax)
        for r in list(rules)
        if "LayerNorm." in r.hf
    ]
    return rules


def param_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """Flat ``{"path/to/param": shape}`` of a ``DprEncoder`` without allocating it."""
    abstract = jax.eval_shape(
        lambda: DprEncoder(config).init(jax.random.PRNGKey(0), jax.numpy.zeros((1, 4), np.int32))
    )
    flat = hf_io.flatten_params(nn.meta.unbox(abstract["params"]))
    return {k: tuple(v.shape) for k, v in flat.items()}


def detect_kind(hf_config: Mapping[str, Any], state: Mapping[str, Any], source: str) -> tuple[str, str, str]:
    """Which tower a directory holds: returns (kind, bert_prefix, proj_prefix)."""
    keys = list(state)
    if any(k.startswith("question_encoder.") for k in keys):
        return ("question",) + _PREFIX["question"]
    if any(k.startswith("ctx_encoder.") for k in keys):
        return ("context",) + _PREFIX["context"]
    if any(k.startswith("bert.") for k in keys):
        return "bert", "bert.", "encode_proj."
    if any(k.startswith("embeddings.") for k in keys):
        return ("bert",) + _PREFIX["bert"]
    raise CheckpointError(
        f"{source}: not a DPR encoder or BERT checkpoint (no question_encoder./ctx_encoder./embeddings. keys)"
    )


def load_dpr(path: str | os.PathLike, **config_overrides: Any) -> tuple[BertConfig, dict, str]:
    """Reads an HF DPR/BERT directory -> (config, unboxed params, kind)."""
    hf_config = hf_io.read_config(path)
    config = config_from_hf(hf_config, f"{path}/config.json", **config_overrides)
    state = hf_io.load_state_dict(path)
    source = hf_io.weights_file(path)
    kind, prefix, proj_prefix = detect_kind(hf_config, state, source)
    flat = hf_io.import_params(
        state,
        bert_rules(config.num_hidden_layers, prefix, proj_prefix),
        param_shapes(config),
        source,
        ignore=_IGNORE,
    )
    return config, hf_io.unflatten_params(flat), kind


def dpr_to_hf(config: BertConfig, params: Mapping[str, Any], kind: str = "question") -> tuple[dict, dict]:
    """Unboxed flax params -> (HF state dict, HF config dict)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    prefix, proj_prefix = _PREFIX[kind]
    flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in hf_io.flatten_params(params).items()}
    rules = [r for r in bert_rules(config.num_hidden_layers, prefix, proj_prefix) if "gamma" not in r.hf and "beta" not in r.hf]
    return hf_io.export_params(flat, rules), config_to_hf(config, kind)
