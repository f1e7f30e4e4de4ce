"""Shared defaults for every rag_jax training config.

Other configs start from ``get_config()`` here and override. Launch with
``python launch/train.py --config=configs/x.py --config.train.lr=1e-5 --workdir=DIR``.
"""
import ml_collections

from rag_jax.parallel.rules import DEFAULT_RULES


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.variant = "sequence"  # RAG-Sequence | RAG-Token ("token")
    # HF directories (DPRQuestionEncoder / BertModel, BartForConditionalGeneration).
    # Empty: a random model with the ``tiny`` shapes below.
    m.question_encoder = ""
    m.generator = ""
    # Tokenizer directories; "" = the model directory's own files, or, for a
    # tiny random model, tokenizers trained on the run's data under workdir.
    m.question_tokenizer = ""
    m.generator_tokenizer = ""
    m.dtype = "bfloat16"  # compute dtype
    m.param_dtype = "float32"
    # Of every matmul in both towers: highest | high | default (jax.lax.Precision).
    m.matmul_precision = "highest"
    # Rematerialisation of each BERT/BART layer under the gradient: none |
    # minimal (keep only weight-matmul outputs) | full (keep only layer inputs).
    # Trades backward-pass recompute for activation memory; same loss/gradients.
    m.remat = "none"
    m.dropout = 0.1  # None keeps the checkpoint's own dropout settings
    m.tiny = ml_collections.ConfigDict()
    m.tiny.question_encoder = ml_collections.ConfigDict(dict(
        vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64,
    ))
    m.tiny.generator = ml_collections.ConfigDict(dict(
        vocab_size=128, d_model=32, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=128,
    ))
    # > 0: a from-scratch generator's position tables start as sin/cos times
    # this scale (models/bart.py sinusoidal_positions) instead of N(0, init_std).
    m.tiny.generator_sinusoidal_positions = 0.0

    c.data = d = ml_collections.ConfigDict()
    d.train_file = ""
    d.dev_file = ""
    d.test_file = ""
    d.format = "auto"  # one of rag_jax.data.qa_formats.FORMATS, or auto (from the name and first line)
    d.dataset_dir = ""  # where the TFDS array_record dataset is built; "" = workdir/data
    d.max_source_length = 128  # question tokens
    d.max_target_length = 25  # answer tokens
    d.max_combined_length = 300  # "title / text // question" per doc (HF)
    # Training batches: "max_length" pads questions, contexts and targets to the
    # maxima above (HF finetune_rag); "bucket" to the global batch's longest row
    # rounded up to one of length_buckets (or the maximum), the same loss on
    # fewer positions (rag_jax/data/padding.py). Steps of 32 bound the padding
    # a bucket adds to 31 tokens, and a DPR-passage batch's longest context
    # (about 150-250 BART tokens) falls in 2-3 of them: few extra compiles.
    d.padding = "bucket"
    d.length_buckets = (16, 32, 64, 96, 128, 160, 192, 224, 256)
    d.num_threads = 2  # grain read threads per process

    # What the generator is trained to produce and how its output is scored
    # (rag_jax/train/evaluate.py): qa (EM/F1, or regex EM with
    # answer_match="regex" for CuratedTrec), abstractive (BLEU-1/ROUGE-L),
    # question_generation (Q-BLEU-1, BLEU-1, distinct-n), classification
    # (label accuracy; FEVER).
    c.task = k = ml_collections.ConfigDict()
    k.kind = "qa"
    k.answer_match = "string"  # string | regex (qa only)
    # classification: the classes, as the records' label strings. Each maps to
    # ONE generator token (label_words[i], or the label itself when
    # label_words is empty); training is the RAG NLL of ``<s> token </s>``,
    # prediction the arg-max over these tokens at the first decoder step.
    k.labels = ()
    k.label_words = ()
    # Records whose label is listed here are dropped from training and
    # evaluation (2-way FEVER: ("NOT ENOUGH INFO",)); any other label outside
    # ``labels`` is an error naming its file and line.
    k.ignore_labels = ()

    c.retrieval = r = ml_collections.ConfigDict()
    r.index_dir = ""  # a dense (scann/exact) index, or a BM25 one (then train.freeze_question_encoder=True)
    r.n_docs = 5
    # True: retrieval inside the jitted train step. The index's vectors and its
    # passage token table (built beside the index on first use) are sharded
    # over the batch's mesh axes; the host feeds only question and answer
    # tokens. Needs count / shards x (dim x 4|2 + 4 x (max_combined_length - 2)
    # + 4) bytes per device (config_checks states it). False: host ScaNN.
    r.on_device = False
    r.device_dtype = "float32"  # float32 | bfloat16: the on-device document vectors
    r.approx_recall = 0.0  # 0: exact lax.top_k per shard; in (0, 1): lax.approx_max_k's recall target
    # Per-device budget for the on-device index; 0: half the device's memory
    # when the backend reports it (GPU, TPU), unchecked otherwise (CPU).
    r.device_budget_gib = 0.0
    # Hybrid retrieval (rag_jax/retrieval/fusion.py): a BM25 index of the same
    # corpus next to the dense index_dir, fused by "rrf" (reciprocal rank,
    # constant rrf_k) or "score" (min-max normalised, fusion_weight on the
    # dense side) over each one's top fusion_depth; doc_scores stay q . d.
    r.bm25_dir = ""
    r.fusion = "none"  # none | rrf | score
    r.rrf_k = 60.0
    r.fusion_weight = 0.5
    r.fusion_depth = 100

    c.train = t = ml_collections.ConfigDict()
    t.steps = 1000
    t.per_device_batch_size = 8
    t.grad_accum_steps = 1
    # 0 = per_device_batch_size x devices x grad_accum_steps; set it to keep the
    # optimisation identical across mesh sizes.
    t.global_batch_size = 0
    t.lr = 3e-5
    # Learning-rate factor of the question encoder relative to train.lr
    # (1.0 = the paper's single learning rate).
    t.question_encoder_lr_scale = 1.0
    t.warmup_steps = 500
    t.schedule = "polynomial"  # polynomial | linear | constant
    t.end_lr = 1e-7  # HF polynomial schedule default
    t.weight_decay = 0.001
    t.max_grad_norm = 0.1
    t.label_smoothing = 0.1
    t.adam_b1 = 0.9
    t.adam_b2 = 0.999
    t.adam_eps = 1e-8
    t.seed = 0
    t.exclude_bos_score = False
    # Ablations from the paper: frozen retriever, closed-book BART (no retrieval).
    t.freeze_question_encoder = False
    t.closed_book = False
    t.log_every = 10

    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one entry may be -1
    c.mesh.logical_axis_rules = DEFAULT_RULES

    c.checkpoint = k = ml_collections.ConfigDict()
    k.every = 1000
    k.keep = 3
    k.async_save = True

    c.eval = e = ml_collections.ConfigDict()
    e.every = 1000
    e.batch_size = 8
    e.num_beams = 1  # greedy QA decoding, as the paper
    e.max_length = 25
    e.decoding = "thorough"
    e.max_examples = 0  # 0 = whole split

    c.multihost = False  # True: jax.distributed.initialize() before anything else
    return c
