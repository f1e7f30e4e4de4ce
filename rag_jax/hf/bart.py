"""HF <-> rag_jax for ``BartForConditionalGeneration`` (also the generator of
HF RAG checkpoints, whose keys carry a ``rag.generator.`` prefix)."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import jax
import numpy as np
from flax import linen as nn

from rag_jax.hf import io as hf_io
from rag_jax.hf.io import CheckpointError, Rule
from rag_jax.models.bart import Bart, BartConfig

_HANDLED = (
    "vocab_size", "d_model", "encoder_layers", "decoder_layers", "encoder_attention_heads",
    "decoder_attention_heads", "encoder_ffn_dim", "decoder_ffn_dim", "activation_function",
    "max_position_embeddings", "scale_embedding", "dropout", "attention_dropout", "activation_dropout",
    "init_std", "pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id",
    "forced_bos_token_id", "forced_eos_token_id",
    # Read only to refuse values we do not implement:
    "tie_word_embeddings", "is_encoder_decoder", "normalize_before", "add_final_layer_norm",
    "normalize_embedding", "static_position_embeddings", "add_bias_logits", "extra_pos_embeddings",
    "encoder_layerdrop", "decoder_layerdrop", "is_decoder", "add_cross_attention", "tie_encoder_decoder",
    "model_type", "do_blenderbot_90_layernorm",
)
_INERT = (
    "architectures", "transformers_version", "classif_dropout", "xla_device", "forced_decoder_ids",
    "max_new_tokens", "fp16", "dtype", "torch_dtype", "_name_or_path",
    "name_or_path", "id2label", "label2id", "num_labels", "classifier_dropout", "use_cache",
    "gradient_checkpointing", "output_past", "num_hidden_layers", "task_specific_params", "prefix",
    "no_repeat_ngram_size", "num_beams", "early_stopping", "length_penalty", "max_length", "min_length",
    "force_bos_token_to_be_generated", "output_attentions", "output_hidden_states", "return_dict",
    "torchscript", "use_bfloat16", "problem_type", "tokenizer_class", "sep_token_id", "chunk_size_feed_forward",
    "bad_words_ids", "do_sample", "temperature", "top_k", "top_p", "repetition_penalty",
    "num_return_sequences", "diversity_penalty", "num_beam_groups", "finetuning_task", "pruned_heads",
    "_attn_implementation_autoset", "_attn_implementation", "decoder_no_repeat_ngram_size",
    "return_dict_in_generate", "output_scores", "remove_invalid_values", "exponential_decay_length_penalty",
    "suppress_tokens", "begin_suppress_tokens", "typical_p", "encoder_no_repeat_ngram_size",
    "cross_attention_hidden_size", "tf_legacy_loss",
)
_REQUIRED = {
    "tie_word_embeddings": [True],
    "is_encoder_decoder": [True],
    "normalize_before": [False],
    "add_final_layer_norm": [False],
    "normalize_embedding": [True],
    "static_position_embeddings": [False],
    "add_bias_logits": [False],
    "extra_pos_embeddings": [2],
    "encoder_layerdrop": [0.0, 0],
    "decoder_layerdrop": [0.0, 0],
    "is_decoder": [False],
    "add_cross_attention": [False],
    "tie_encoder_decoder": [False],
    "do_blenderbot_90_layernorm": [False],  # transformers 3.x configs (e.g. RAG's generator) carry it
    # mbart / plbart / blenderbot... share most keys but are pre-LN or differ in
    # embeddings; only BART's math is implemented.
    "model_type": ["bart"],
}
# Buffers / duplicates that carry nothing beyond what the rules map.
_IGNORE = (r"embed_positions\._float_tensor$", r"position_ids$")
# BartConfig fields that are ours (how to compute), not HF attributes.
_OURS = ("dtype", "param_dtype", "precision", "remat")
_TIED = ("model.shared.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight", "lm_head.weight")


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json", **overrides: Any) -> BartConfig:
    hf_io.check_config_keys(hf, _HANDLED, _INERT, source)
    for key, allowed in _REQUIRED.items():
        hf_io.require_value(hf, key, allowed, source)
    kwargs = {f.name: hf[f.name] for f in dataclasses.fields(BartConfig) if f.name in hf and f.name not in _OURS}
    kwargs.update(overrides)
    try:
        return BartConfig(**kwargs)
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


bart_config_from_hf = config_from_hf


def config_to_hf(config: BartConfig) -> dict[str, Any]:
    out = {f.name: getattr(config, f.name) for f in dataclasses.fields(BartConfig) if f.name not in _OURS}
    out.update(
        model_type="bart",
        architectures=["BartForConditionalGeneration"],
        is_encoder_decoder=True,
        tie_word_embeddings=True,
        dtype="float32",
    )
    return out


def bart_rules(prefix: str = "") -> list[Rule]:
    """Key map; ``prefix`` is e.g. ``"rag.generator."`` inside RAG checkpoints."""
    p = prefix
    rules = [
        Rule(f"{p}model.shared.weight", "shared/embedding"),
        Rule(f"{p}final_logits_bias", "final_logits_bias"),
        Rule(f"{p}model.encoder.embed_positions.weight", "encoder_positions/embedding"),
        Rule(f"{p}model.decoder.embed_positions.weight", "decoder_positions/embedding"),
        Rule(f"{p}model.encoder.layernorm_embedding.weight", "encoder_ln_embedding/scale"),
        Rule(f"{p}model.encoder.layernorm_embedding.bias", "encoder_ln_embedding/bias"),
        Rule(f"{p}model.decoder.layernorm_embedding.weight", "decoder_ln_embedding/scale"),
        Rule(f"{p}model.decoder.layernorm_embedding.bias", "decoder_ln_embedding/bias"),
    ]
    for side, attns in (("encoder", ("self_attn",)), ("decoder", ("self_attn", "encoder_attn"))):
        hp, fp = f"{p}model.{side}.layers.{{i}}.", f"{side}_layers_{{i}}/"
        for attn in attns:
            for hf_name, ours in (("q_proj", "query"), ("k_proj", "key"), ("v_proj", "value")):
                rules += [
                    Rule(f"{hp}{attn}.{hf_name}.weight", f"{fp}{attn}/{ours}/kernel", "linear"),
                    Rule(f"{hp}{attn}.{hf_name}.bias", f"{fp}{attn}/{ours}/bias"),
                ]
            rules += [
                Rule(f"{hp}{attn}.out_proj.weight", f"{fp}{attn}/out/kernel", "linear", in_dims=2),
                Rule(f"{hp}{attn}.out_proj.bias", f"{fp}{attn}/out/bias"),
                Rule(f"{hp}{attn}_layer_norm.weight", f"{fp}{attn}_ln/scale"),
                Rule(f"{hp}{attn}_layer_norm.bias", f"{fp}{attn}_ln/bias"),
            ]
        rules += [
            Rule(f"{hp}fc1.weight", f"{fp}fc1/kernel", "linear"),
            Rule(f"{hp}fc1.bias", f"{fp}fc1/bias"),
            Rule(f"{hp}fc2.weight", f"{fp}fc2/kernel", "linear"),
            Rule(f"{hp}fc2.bias", f"{fp}fc2/bias"),
            Rule(f"{hp}final_layer_norm.weight", f"{fp}final_ln/scale"),
            Rule(f"{hp}final_layer_norm.bias", f"{fp}final_ln/bias"),
        ]
    return rules


def param_shapes(config: BartConfig) -> dict[str, tuple[int, ...]]:
    ids = jax.numpy.ones((1, 4), np.int32)
    abstract = jax.eval_shape(lambda: Bart(config).init(jax.random.PRNGKey(0), ids, ids, ids))
    flat = hf_io.flatten_params(nn.meta.unbox(abstract["params"]))
    return {k: tuple(v.shape) for k, v in flat.items()}


def fold_tied_embeddings(state: dict[str, np.ndarray], prefix: str, source: str) -> dict[str, np.ndarray]:
    """HF files hold the shared embedding under up to four names: keep one.

    Copies must be equal; different values mean untied weights, which the
    tied model cannot represent, so they fail instead of being dropped.
    """
    state = dict(state)
    names = [prefix + n for n in _TIED if prefix + n in state]
    if not names:
        return state
    keep = state.pop(names[0])
    for name in names[1:]:
        other = state.pop(name)
        if other.shape != keep.shape or not np.array_equal(other, keep):
            raise CheckpointError(
                f"{source}: {name} differs from {names[0]}; untied input/output embeddings are not supported"
            )
    state[prefix + "model.shared.weight"] = keep
    bias_key = prefix + "final_logits_bias"
    if bias_key in state:
        state[bias_key] = state[bias_key].reshape(-1)
    else:
        # HF lists final_logits_bias as optional on load: absent means zeros.
        state[bias_key] = np.zeros((keep.shape[0],), np.float32)
    return state


def import_bart(
    state: Mapping[str, np.ndarray], config: BartConfig, source: str, prefix: str = ""
) -> dict[str, Any]:
    """Flax params (unboxed, nested) from an HF state dict (possibly a RAG one)."""
    own = {k: v for k, v in state.items() if k.startswith(prefix)}
    own = fold_tied_embeddings(own, prefix, source)
    flat = hf_io.import_params(own, bart_rules(prefix), param_shapes(config), source, ignore=_IGNORE)
    return hf_io.unflatten_params(flat)


def load_bart(path: str | os.PathLike, **config_overrides: Any) -> tuple[BartConfig, dict]:
    hf_config = hf_io.read_config(path)
    config = config_from_hf(hf_config, f"{path}/config.json", **config_overrides)
    state = hf_io.load_state_dict(path)
    return config, import_bart(state, config, hf_io.weights_file(path))


def bart_to_hf(config: BartConfig, params: Mapping[str, Any], prefix: str = "") -> tuple[dict, dict]:
    """(HF state dict, HF config dict); ``final_logits_bias`` is HF's ``[1, V]``."""
    flat = {k: np.asarray(jax.device_get(v), np.float32) for k, v in hf_io.flatten_params(params).items()}
    state = hf_io.export_params(flat, bart_rules(prefix))
    state[prefix + "final_logits_bias"] = state[prefix + "final_logits_bias"].reshape(1, -1)
    return state, config_to_hf(config)
