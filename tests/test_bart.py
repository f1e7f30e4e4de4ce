"""BART generator: parity with transformers, cached decoding, round trip, bad input."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import linen as nn
from jax.sharding import NamedSharding
from safetensors.numpy import load_file, save_file

import rag_jax
from rag_jax.hf import bart as hf_bart
from rag_jax.hf.io import CheckpointError
from rag_jax.data.train_tokenizer import train_bart_tokenizer
from rag_jax.generator import load_generator
from rag_jax.models.bart import Bart, decode_step, decode_tokens, init_cache
from rag_jax.parallel import rules as R
from rag_jax.parallel.mesh import make_mesh
from transformers import BartConfig as HFBartConfig
from transformers import BartForConditionalGeneration

BASE = dict(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=40, max_position_embeddings=40,
            init_std=0.5, dropout=0.0)
VARIANTS = {
    "gelu": {},
    "relu_scaled": dict(activation_function="relu", scale_embedding=True),
    "deep_encoder": dict(encoder_layers=3, decoder_layers=1, scale_embedding=True),
    "shallow_encoder": dict(encoder_layers=1, decoder_layers=3, activation_function="gelu_new"),
}


def _init_big(model, std=0.5):
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, std)
        model.final_logits_bias.normal_(0.0, std)


@pytest.fixture(scope="module")
def bart_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bart")
    out = {}
    for name, extra in VARIANTS.items():
        model = BartForConditionalGeneration(HFBartConfig(**{**BASE, **extra})).eval()
        _init_big(model)
        model.save_pretrained(root / name)
        out[name] = (root / name, model)
    return out


@pytest.fixture(scope="module")
def gens(bart_dirs):
    # One Generator per variant for the whole module: its jitted logits
    # compile once per input shape, which keeps this file fast.
    return {name: rag_jax.load_generator(path) for name, (path, _) in bart_dirs.items()}


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, 96, (3, 9))
    lens = [9, 5, 2]
    mask = np.zeros_like(ids)
    for i, n in enumerate(lens):
        mask[i, :n] = 1
    ids = np.where(mask == 1, ids, 1)  # pad id 1, ragged
    dec = rng.integers(3, 96, (3, 6))
    dec[:, 0] = 2
    return ids, mask, dec


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_decoder_padding_mask_matches_transformers(bart_dirs, gens):
    path, ref = bart_dirs["relu_scaled"]
    ids, mask, dec = _inputs(4)
    dec_mask = np.ones_like(dec)
    dec_mask[1, 4:] = 0
    dec_mask[2, 2:] = 0
    dec = np.where(dec_mask == 1, dec, 1)
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask), decoder_input_ids=torch.tensor(dec),
                   decoder_attention_mask=torch.tensor(dec_mask)).logits.numpy()
    got = np.asarray(gens["relu_scaled"].logits(ids, mask, dec, dec_mask))
    keep = dec_mask == 1
    assert _rel_err(got[keep], want[keep]) < 1e-5


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(bart_dirs, gens, name):
    path, ref = bart_dirs[name]
    gen = gens[name]
    ids, mask, dec = _inputs()
    with torch.no_grad():
        want = ref(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                   decoder_input_ids=torch.tensor(dec)).logits.numpy()
    got = gen.logits(ids, mask, dec)
    assert got.shape == want.shape == (3, 6, 96)
    assert _rel_err(got, want) < 1e-5


def test_cached_decoding_equals_full_forward(gens):
    gen = gens["deep_encoder"]
    ids, mask, dec = _inputs(1)
    full = gen.logits(ids, mask, dec)
    model, params = gen.model, gen.params
    enc = model.apply({"params": params}, ids, mask, method=Bart.encode)
    new_cache = jax.jit(lambda: init_cache(model, params, enc, jnp.asarray(mask), max_length=8))
    cache = new_cache()
    step = jax.jit(lambda c, t: decode_step(model, params, c, t, enc, jnp.asarray(mask)))
    outs = []
    for t in range(dec.shape[1]):
        logits, cache = step(cache, dec[:, t : t + 1])
        assert logits.shape == (3, 96) and logits.dtype == jnp.float32
        outs.append(logits)
    assert int(cache["decoder_layers_0"]["self_attn"]["cache_index"]) == dec.shape[1]
    assert _rel_err(jnp.stack(outs, axis=1), full) < 1e-5
    # Several tokens at once after a cached prefix (a forced prefix) also agree.
    chunk = jax.jit(lambda c, t: decode_tokens(model, params, c, t, enc, jnp.asarray(mask)))
    first, cache = chunk(new_cache(), dec[:, :2])
    rest, cache = chunk(cache, dec[:, 2:5])
    assert _rel_err(jnp.concatenate([first, rest], axis=1), full[:, :5]) < 1e-5


def test_decode_step_inside_while_loop(gens):
    """Decoding in lax.while_loop with fixed shapes equals decoding by
    repeated full forward passes. Tokens are argmax(logits + fixed noise): a
    random model's plain greedy output is often one constant token, which
    would not show a wrong cache position."""
    gen = gens["shallow_encoder"]
    ids, mask, _ = _inputs(3)
    model, params, steps = gen.model, gen.params, 5
    enc_mask = jnp.asarray(mask)
    noise = np.random.default_rng(5).gumbel(size=(steps, ids.shape[0], 96)).astype(np.float32) * 4.0

    @jax.jit
    def greedy(params):
        enc = model.apply({"params": params}, ids, enc_mask, method=Bart.encode)
        cache = init_cache(model, params, enc, enc_mask, steps)
        out = jnp.full((ids.shape[0], steps + 1), 2, jnp.int32)

        def body(state):
            t, out, cache = state
            logits, cache = decode_step(model, params, cache, jax.lax.dynamic_slice_in_dim(out, t, 1, 1), enc, enc_mask)
            out = jax.lax.dynamic_update_slice_in_dim(out, jnp.argmax(logits + jnp.asarray(noise)[t], -1)[:, None].astype(jnp.int32), t + 1, 1)
            return t + 1, out, cache

        return jax.lax.while_loop(lambda s: s[0] < steps, body, (0, out, cache))[1]

    got = np.asarray(greedy(params))
    # Reference: full forward passes over a fixed-length buffer (the causal
    # mask makes the not-yet-written tail irrelevant), one compilation.
    want = np.full((ids.shape[0], steps + 1), 2)
    for t in range(steps):
        want[:, t + 1] = np.argmax(np.asarray(gen.logits(ids, mask, want))[:, t] + noise[t], -1)
    np.testing.assert_array_equal(got, want)
    assert len(set(want[:, 1:].ravel().tolist())) > 3  # not a degenerate constant output


def reorder_cache(cache, index):
    # Every cache leaf has the rows first except the scalar cache_index, which
    # all rows share: gathering rows moves whole hypotheses (beam reordering).
    return jax.tree.map(lambda x: x if x.ndim == 0 else jnp.take(x, index, axis=0), cache)


def test_reorder_cache_follows_beams(gens):
    gen = gens["gelu"]
    ids, mask, dec = _inputs(2)
    model, params = gen.model, gen.params
    # Reorder and expand at once (beam search: 3 rows -> 4 hypotheses).
    perm = jnp.array([2, 0, 0, 1])

    @jax.jit
    def two_steps(params):
        enc = model.apply({"params": params}, ids, mask, method=Bart.encode)
        cache = init_cache(model, params, enc, jnp.asarray(mask), 6)
        _, cache = decode_step(model, params, cache, dec[:, :1], enc, jnp.asarray(mask))
        moved = reorder_cache(cache, perm)
        return decode_step(model, params, moved, dec[perm, 1:2], None, jnp.asarray(mask)[perm])[0]

    logits = two_steps(params)
    full = gen.logits(ids[perm], mask[perm], dec[perm, :2])
    assert _rel_err(logits, full[:, 1]) < 1e-5


def test_grouped_cross_attention_equals_copied_rows(gens):
    """Beams of one row can share its cached cross K/V (no copy per beam):
    the decoder folds them into the query axis and gives the same logits."""
    from rag_jax.rag.decoding import reorder_self_cache

    gen = gens["gelu"]
    ids, mask, dec = _inputs(2)
    mask = np.asarray(mask).copy()
    mask[1, -2:] = 0  # a padded row: its key mask must follow its beams
    model, params = gen.model, gen.params
    beams = 3
    rows = jnp.repeat(jnp.arange(ids.shape[0]), beams)

    @jax.jit
    def three_steps(params, cache):
        out = []
        for t in range(3):
            logits, cache = decode_step(model, params, cache, dec[rows, t:t + 1], None, jnp.asarray(mask)[rows])
            out.append(logits)
        return jnp.stack(out, 1)

    enc = model.apply({"params": params}, ids, jnp.asarray(mask), method=Bart.encode)
    cache = init_cache(model, params, enc, jnp.asarray(mask), 6)
    copied = three_steps(params, reorder_cache(cache, rows))
    grouped_cache = reorder_self_cache(cache, rows)
    assert grouped_cache["decoder_layers_0"]["encoder_attn"]["cross_key"].shape[0] == ids.shape[0]
    grouped = three_steps(params, grouped_cache)
    assert _rel_err(grouped, copied) < 1e-6
    full = gen.logits(ids[rows], mask[rows], dec[rows, :3])
    assert _rel_err(grouped, full) < 1e-5


def test_matmul_precision_is_ours_not_an_hf_attribute(bart_dirs, gens):
    path, _ = bart_dirs["gelu"]
    config, _ = hf_bart.load_bart(path, precision="default")
    assert config.precision == "default" and gens["gelu"].config.precision == "highest"
    hf = hf_bart.config_to_hf(config)
    assert "precision" not in hf  # an exported config.json stays a plain HF one
    assert hf_bart.config_from_hf(hf) == config.replace(precision="highest")
    with pytest.raises(CheckpointError, match="precision 'fastest'"):
        hf_bart.config_from_hf(hf, precision="fastest")


def test_bf16_compute_f32_params(bart_dirs, gens):
    path, _ = bart_dirs["gelu"]
    ids, mask, dec = _inputs()
    f32 = gens["gelu"].logits(ids, mask, dec)
    gen = load_generator(path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(gen.params))
    got = gen.logits(ids, mask, dec)
    assert got.dtype == jnp.float32
    assert 0 < _rel_err(got, f32) < 5e-2


def test_dropout_in_training_mode(gens):
    """deterministic=False draws dropout from the "dropout" rng; the
    default (deterministic) path ignores the config's rates."""
    gen = gens["gelu"]
    model = Bart(gen.config.replace(dropout=0.3, attention_dropout=0.2, activation_dropout=0.1))
    ids, mask, dec = _inputs()
    fwd = jax.jit(lambda key, det: model.apply({"params": gen.params}, ids, mask, dec, deterministic=det,
                                               rngs={"dropout": key}), static_argnums=1)
    a, b = fwd(jax.random.PRNGKey(0), False), fwd(jax.random.PRNGKey(1), False)
    assert np.all(np.isfinite(a)) and _rel_err(a, b) > 1e-2
    np.testing.assert_array_equal(a, fwd(jax.random.PRNGKey(0), False))
    assert _rel_err(fwd(jax.random.PRNGKey(0), True), gen.logits(ids, mask, dec)) < 1e-6


def test_round_trip_to_transformers(bart_dirs, gens, tmp_path):
    path, ref = bart_dirs["relu_scaled"]
    src = _copy(path, tmp_path / "src")
    train_bart_tokenizer(["Trask Holdings was founded in Osterby by Ilse Varga."] * 5, src, vocab_size=300, min_frequency=1)
    gen = rag_jax.load_generator(src)
    assert gen.tokenizer is not None
    gen.save_hf(tmp_path / "out")
    back = BartForConditionalGeneration.from_pretrained(tmp_path / "out")
    want, got = ref.state_dict(), back.state_dict()
    assert set(want) == set(got)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key].numpy(), value.numpy(), err_msg=key)
    assert back.config.scale_embedding and back.config.activation_function == "relu"
    again = rag_jax.load_generator(tmp_path / "out")
    text = ["Ilse Varga in Osterby"]
    np.testing.assert_array_equal(again.tokenizer(text, max_length=8)["input_ids"], gen.tokenizer(text, max_length=8)["input_ids"])
    for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(gens["relu_scaled"].params)):
        np.testing.assert_array_equal(a, b)


def test_rag_prefixed_keys(bart_dirs, gens):
    """The RAG importer reuses the map with ``rag.generator.`` prefixed keys."""
    path, _ = bart_dirs["gelu"]
    gen = gens["gelu"]
    state = {"rag.generator." + k: v for k, v in load_file(str(path / "model.safetensors")).items()}
    state["rag.question_encoder.some.weight"] = np.zeros(2, np.float32)  # another model's key: not ours
    params = hf_bart.import_bart(state, gen.config, "rag.safetensors", prefix="rag.generator.")
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(gen.params)):
        np.testing.assert_array_equal(a, b)
    out, _ = hf_bart.bart_to_hf(gen.config, gen.params, prefix="rag.generator.")
    assert all(k.startswith("rag.generator.") for k in out)
    assert out["rag.generator.final_logits_bias"].shape == (1, 96)
    with pytest.raises(CheckpointError, match="rag.generator.model.encoder.layers.0.fc1.weight"):
        state.pop("rag.generator.model.encoder.layers.0.fc1.weight")
        state["rag.generator.model.encoder.layers.0.fc1.weight"] = np.zeros((3, 3), np.float32)
        hf_bart.import_bart(state, gen.config, "rag.safetensors", prefix="rag.generator.")


def test_params_logical_axes_and_sharded_forward(gens):
    gen = gens["gelu"]
    mesh = make_mesh((2, 2, 2))
    ids, mask, dec = _inputs()
    boxed = jax.eval_shape(lambda: gen.model.init(jax.random.PRNGKey(0), ids, mask, dec))["params"]
    leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    assert leaves and all(isinstance(x, nn.Partitioned) for x in leaves)
    assert all(n in dict(R.DEFAULT_RULES) for x in leaves for n in x.names)
    shardings = R.mesh_shardings(boxed, mesh)
    for leaf, sh in zip(leaves, jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, NamedSharding))):
        assert sh.spec == R.leaf_spec(leaf.names, leaf.value.shape, mesh)
    assert shardings["shared"]["embedding"].spec == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert shardings["decoder_layers_0"]["encoder_attn"]["out"]["kernel"].spec == jax.sharding.PartitionSpec("tensor", None, "fsdp")
    sharded = jax.device_put(gen.params, shardings)
    got = jax.jit(gen.apply_fn)(sharded, ids, mask, dec)
    np.testing.assert_allclose(np.asarray(got), np.asarray(gen.logits(ids, mask, dec)), rtol=1e-5, atol=1e-4)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_and_extra_weights_named(bart_dirs, tmp_path):
    d = _copy(bart_dirs["gelu"][0], tmp_path / "missing")
    state = load_file(str(d / "model.safetensors"))
    del state["model.decoder.layers.1.fc2.bias"]
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="decoder_layers_1/fc2/bias"):
        rag_jax.load_generator(d)
    d = _copy(bart_dirs["gelu"][0], tmp_path / "extra")
    state = load_file(str(d / "model.safetensors"))
    state["model.encoder.layer_norm.weight"] = np.ones(32, np.float32)
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"model\.encoder\.layer_norm\.weight"):
        rag_jax.load_generator(d)


def test_tied_embedding_copies(bart_dirs, tmp_path):
    """Equal copies of the shared embedding under any of HF's four names load;
    a differing copy (untied weights) is refused, naming the key."""
    d = _copy(bart_dirs["gelu"][0], tmp_path / "tied")
    state = load_file(str(d / "model.safetensors"))
    shared = state.pop("model.shared.weight")
    for key in ("lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight"):
        state[key] = shared
    save_file(state, str(d / "model.safetensors"))
    _, params = hf_bart.load_bart(d)
    np.testing.assert_array_equal(params["shared"]["embedding"], shared)
    state["lm_head.weight"] = shared + 1.0
    save_file(state, str(d / "model.safetensors"))
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        rag_jax.load_generator(d)


def test_legacy_config_keys_at_default_values_load(bart_dirs, tmp_path):
    """Configs written by transformers 3.x / 4.x (bart-base, RAG's generator)
    carry switches for variants BART never used; at their BART values they load."""
    d = _copy(bart_dirs["gelu"][0], tmp_path / "legacy")
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(normalize_before=False, add_final_layer_norm=False, normalize_embedding=True,
               static_position_embeddings=False, add_bias_logits=False, extra_pos_embeddings=2,
               do_blenderbot_90_layernorm=False, classif_dropout=0.1, output_past=True,
               force_bos_token_to_be_generated=False, num_hidden_layers=2, gradient_checkpointing=False,
               torch_dtype="float32", no_repeat_ngram_size=3, num_beams=4)
    (d / "config.json").write_text(json.dumps(cfg))
    config, _ = hf_bart.load_bart(d)
    assert config.encoder_ffn_dim == 48 and config.decoder_ffn_dim == 40 and config.init_std == 0.5


@pytest.mark.parametrize("key,value", [("do_blenderbot_90_layernorm", True), ("normalize_before", True), ("add_final_layer_norm", True),
                                       ("model_type", "mbart"), ("tie_encoder_decoder", True),
                                       ("activation_function", "mish"), ("brand_new_flag", 1)])
def test_unsupported_config_named(bart_dirs, tmp_path, key, value):
    d = _copy(bart_dirs["gelu"][0], tmp_path / "cfg")
    cfg = json.loads((d / "config.json").read_text())
    cfg[key] = value
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=key if key != "activation_function" else "mish"):
        rag_jax.load_generator(d)
