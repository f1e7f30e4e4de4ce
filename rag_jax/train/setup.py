"""Everything a run needs before its first step: tokenizers (trained on the
run's own text when none is given), models (HF checkpoints or tiny random
ones), the RAG task around the retriever, the training data loader, and the
params of a finished checkpoint."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from rag_jax.data import qa_formats
from rag_jax.data.padding import bucket_set
from rag_jax.data.pipeline import dataset_from_config, train_loader_from_config
from rag_jax.data.tokenize import TextTokenizer, check_tokenizer_dir, load_tokenizer
from rag_jax.rag.settings import RagSettings
from rag_jax.models.bart import Bart, BartConfig
from rag_jax.models.bert import BertConfig, DprEncoder
from rag_jax.models.layers import DTYPES
from rag_jax.rag.labels import label_space
from rag_jax.rag.model import RagConfig
from rag_jax.train.checkpointing import CheckpointManager
from rag_jax.train.optim import optimizer_from_config
from rag_jax.train.state import TrainState
from rag_jax.train.task import RagTask



@dataclasses.dataclass
class Models:
    question_config: BertConfig
    generator_config: BartConfig
    params: dict[str, Any]  # {"question_encoder": ..., "generator": ...}, unboxed, host
    question_tokenizer: TextTokenizer
    generator_tokenizer: TextTokenizer


def check_inputs(config: Any, required: tuple[str, ...] = ("train",), need_index: bool = True,
                 trained_workdir: str | os.PathLike | None = None) -> None:
    """Fails on a missing, empty or malformed input before a run writes
    anything (trained tokenizers, the TFDS dataset): parses every QA file of
    ``config.data`` in full and checks that the directories the config names
    exist. The splits in ``required`` must have a file; ``need_index`` is
    False when the caller brings its own retriever; ``trained_workdir`` (for
    evaluation) must hold a ``checkpoints`` directory."""
    d = config.data
    for split in ("train", "dev", "test"):
        field = f"config.data.{split}_file"
        path = d.get(f"{split}_file", "")
        if not path:
            if split in required:
                raise ValueError(f"{field} is empty: set --{field}=FILE "
                                 "(.jsonl, DPR .csv/.tsv, or X for X.source + X.target)")
            continue
        kind = qa_formats.detect_format(path) if d.format == "auto" else d.format
        for f in qa_formats.seq2seq_paths(path) if kind == "seq2seq" else (Path(path),):
            if not Path(f).is_file():
                raise FileNotFoundError(f"{f}: no such file ({field})")
        records = qa_formats.read_qa(path, d.format)  # raises on the first bad line, or on no questions
        if config.task.kind == "classification":
            records = _labels_checked(records, config.task)
        # Training data must also yield targets (a test file without answers
        # fails here, naming its first line, before anything is written).
        for _ in qa_formats.training_pairs(records) if split == "train" and "train" in required else records:
            pass
    dirs = [f"model.{k}" for k in ("question_encoder", "generator", "question_tokenizer", "generator_tokenizer")]
    if need_index and not config.train.closed_book:
        if not config.retrieval.index_dir:
            raise ValueError("config.retrieval.index_dir is empty: set --config.retrieval.index_dir=DIR "
                             "(made by rag-jax build-index), or --config.train.closed_book")
        dirs.append("retrieval.index_dir")
        if config.retrieval.get("bm25_dir", ""):
            dirs.append("retrieval.bm25_dir")
    for field in dirs:
        section, key = field.split(".")
        value = config[section].get(key, "")
        if value and not Path(value).is_dir():
            raise FileNotFoundError(f"{value}: no such directory (config.{field})")
    # build_models loads these (or trains the missing ones into workdir) in turn.
    m = config.model
    for kind, tokenizer, model in (("bert", "question_tokenizer", "question_encoder"),
                                   ("bart", "generator_tokenizer", "generator")):
        path = m.get(tokenizer, "") or m[model]
        if path:
            check_tokenizer_dir(path, kind)
    if need_index and not config.train.closed_book:
        check_index_kinds(config)
    if trained_workdir is not None and not (Path(trained_workdir) / "checkpoints").is_dir():
        raise FileNotFoundError(f"{Path(trained_workdir) / 'checkpoints'}: no such directory "
                                "(not a training workdir: train into it first)")


def check_label(rec: qa_formats.QARecord, task: Any) -> None:
    """A classification record's label (its first answer) must be one of
    ``task.labels`` or ``task.ignore_labels``: a typo in either would
    otherwise train on, or silently drop, whole classes."""
    label = rec.answers[0] if rec.answers else None
    if label not in tuple(task.labels) + tuple(task.ignore_labels):
        raise qa_formats.QAFormatError(
            f"{rec.source}:{rec.line}: label {label!r} is not in config.task.labels {tuple(task.labels)}"
            + (f" nor config.task.ignore_labels {tuple(task.ignore_labels)}" if task.ignore_labels else ""))


def _labels_checked(records: Iterable[qa_formats.QARecord], task: Any) -> Iterator[qa_formats.QARecord]:
    for rec in records:
        check_label(rec, task)
        yield rec


def kept_records(records: Sequence[qa_formats.QARecord], task: Any) -> list[qa_formats.QARecord]:
    """The records a task trains and evaluates on: classification drops those
    labelled with one of ``task.ignore_labels`` (2-way FEVER drops NOT ENOUGH INFO)."""
    drop = set(task.ignore_labels)
    return [r for r in records if not (drop and r.answers and r.answers[0] in drop)]


def label_words(config: Any) -> tuple[str, ...]:
    """The generator words of a classification task's labels (none for other kinds)."""
    t = config.task
    return (tuple(t.label_words) or tuple(t.labels)) if t.kind == "classification" else ()


def check_index_kinds(config: Any) -> None:
    """The retrieval indexes fit the config: a BM25 ``index_dir`` needs a frozen
    retriever (its scores give the question encoder no gradient: training it
    would only apply weight decay), and a hybrid pairs a dense ``index_dir``
    with a BM25 ``bm25_dir``."""
    from rag_jax.retrieval.index import index_kind

    r = config.retrieval
    kind = index_kind(r.index_dir)
    if kind == "bm25" and r.get("bm25_dir", ""):
        raise ValueError(f"config.retrieval.index_dir: {r.index_dir} is a BM25 index; a hybrid needs a dense "
                         "index there (bm25_dir holds the BM25 one)")
    if kind == "bm25" and not config.train.freeze_question_encoder:
        raise ValueError(f"config.train.freeze_question_encoder: must be True with the BM25 index {r.index_dir} "
                         "(BM25 retrieval is frozen: its scores give the question encoder no gradient)")
    if r.get("bm25_dir", "") and index_kind(r.bm25_dir) != "bm25":
        raise ValueError(f"config.retrieval.bm25_dir: {r.bm25_dir} is a {index_kind(r.bm25_dir)} index, "
                         "not a BM25 one (build-index --index-type bm25)")


def retriever_from_config(config: Any) -> Any:
    """The ``Retriever`` that ``config.retrieval`` names: dense, BM25, or hybrid."""
    from rag_jax.retrieval.fusion import Fusion
    from rag_jax.retrieval.retriever import Retriever

    r = config.retrieval
    if not r.index_dir:
        raise ValueError("config.retrieval.index_dir is empty (set it, or train.closed_book=True)")
    if not r.get("bm25_dir", ""):
        return Retriever(r.index_dir)
    return Retriever(r.index_dir, bm25=r.bm25_dir, fusion=Fusion(r.fusion, float(r.rrf_k), float(r.fusion_weight),
                                                                 int(r.fusion_depth)))


def _train_question_tokenizer(texts: list[str], out: Path, vocab_size: int) -> Path:
    from tokenizers import BertWordPieceTokenizer

    out.mkdir(parents=True, exist_ok=True)
    tok = BertWordPieceTokenizer(lowercase=True)
    tok.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=1, show_progress=False,
                            special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])
    tok.save_model(str(out))
    return out


def _corpus_texts(config: Any) -> list[str]:
    texts = []
    for f in (config.data.train_file, config.data.dev_file):
        if f:
            for rec in qa_formats.read_qa(f, config.data.format):
                texts.append(rec.question)
                if rec.answer_patterns:  # the tokenizer should see the strings trained on, not the patterns
                    texts.extend(p.answer for p in qa_formats.training_pairs([rec]))
                else:
                    texts.extend(rec.answers)
    if config.retrieval.index_dir:
        from rag_jax.retrieval.index import load_index

        corpus = load_index(config.retrieval.index_dir).corpus
        for i in range(min(len(corpus), 20000)):
            texts.append(corpus.title(i) + " " + corpus.text(i))
    return texts


def _written_by_process_zero(out: Path, write: Callable[[Path], Any]) -> Path:
    """``write(out)`` on process 0 while the others wait, then every process
    reads ``out``: several processes writing one workdir's files at once would
    race (the same barrier as the QA dataset's)."""
    if jax.process_index() == 0:
        write(out)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"rag_jax wrote {out}")
    return out


def build_models(config: Any, workdir: str | os.PathLike, rng: jax.Array) -> Models:
    """Loads HF checkpoints named in the config, or builds tiny random ones
    (training their tokenizers on the run's own data when none is given)."""
    m = config.model
    dtype, param_dtype = DTYPES[m.dtype], DTYPES[m.param_dtype]
    # remat only changes what the backward pass keeps; decoding is unaffected by it.
    numerics = dict(dtype=dtype, param_dtype=param_dtype, precision=m.matmul_precision, remat=m.remat)
    dropout = m.get("dropout", None)
    tok_dir = Path(workdir) / "tokenizers"
    texts: list[str] | None = None

    q_tok_path = m.get("question_tokenizer", "") or m.question_encoder
    g_tok_path = m.get("generator_tokenizer", "") or m.generator
    if q_tok_path:
        q_tok = load_tokenizer(q_tok_path, "bert")
    else:
        texts = texts or _corpus_texts(config)
        q_dir = _written_by_process_zero(tok_dir / "question", lambda out: _train_question_tokenizer(
            texts, out, m.tiny.question_encoder.vocab_size))
        q_tok = load_tokenizer(q_dir, "bert")
    if g_tok_path:
        g_tok = load_tokenizer(g_tok_path, "bart")
    else:
        from rag_jax.data.train_tokenizer import train_bart_tokenizer

        texts = texts or _corpus_texts(config)
        # A classification task's label words become whole tokens of the
        # trained vocabulary (rag/labels.py needs one token per label).
        g_dir = _written_by_process_zero(tok_dir / "generator", lambda out: train_bart_tokenizer(
            texts, out, m.tiny.generator.vocab_size, added_tokens=label_words(config)))
        g_tok = load_tokenizer(g_dir, "bart")

    r_q, r_g = jax.random.split(rng)
    if m.question_encoder:
        from rag_jax.hf.bert import load_dpr

        overrides = {} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
        q_cfg, q_params, _ = load_dpr(m.question_encoder, **numerics, **overrides)
    else:
        q_cfg = BertConfig(**{**dict(m.tiny.question_encoder), "vocab_size": q_tok.vocab_size}, **numerics,
                           **({} if dropout is None else {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}))
        ids = jnp.ones((1, 4), jnp.int32)
        q_params = nn.meta.unbox(DprEncoder(q_cfg).init(r_q, ids, ids)["params"])
    if m.generator:
        from rag_jax.hf.bart import load_bart

        overrides = {} if dropout is None else {"dropout": dropout}
        g_cfg, g_params = load_bart(m.generator, **numerics, **overrides)
    else:
        from rag_jax.generator import scratch_generator

        g_cfg, g_params = scratch_generator(
            dict(m.tiny.generator), g_tok, r_g, float(m.tiny.get("generator_sinusoidal_positions", 0.0)),
            **numerics, **({} if dropout is None else {"dropout": dropout}),
        )
    if g_tok.vocab_size > g_cfg.vocab_size:
        raise ValueError(f"generator tokenizer has {g_tok.vocab_size} tokens but the model only {g_cfg.vocab_size}")
    return Models(q_cfg, g_cfg, {"question_encoder": q_params, "generator": g_params}, q_tok, g_tok)


def boxed_params(models: Models) -> Any:
    """Abstract params with logical axis names, for the sharding rules."""
    ids = jnp.ones((1, 4), jnp.int32)
    return jax.eval_shape(lambda: {
        "question_encoder": DprEncoder(models.question_config).init(jax.random.PRNGKey(0), ids, ids)["params"],
        "generator": Bart(models.generator_config).init(jax.random.PRNGKey(0), ids, ids, ids)["params"],
    })



def make_task(config: Any, models: Models, retriever: Any = None) -> RagTask:
    closed = bool(config.train.closed_book)
    if retriever is None and not closed:
        retriever = retriever_from_config(config)
    # The run's own settings, so an exported config.json tells HF (and load_rag) what training used.
    # Not label_smoothing: HF also scores RAG-Sequence candidates with it, which would change decoding.
    settings = RagSettings(
        variant=config.model.variant, n_docs=config.retrieval.n_docs,
        max_combined_length=config.data.max_combined_length, exclude_bos_score=config.train.exclude_bos_score,
    )
    rag_cfg = RagConfig(models.question_config, models.generator_config, settings)
    t = config.task
    labels = (label_space(t.labels, t.label_words, models.generator_tokenizer)
              if t.kind == "classification" else None)
    return RagTask(
        config=rag_cfg, question_tokenizer=models.question_tokenizer, generator_tokenizer=models.generator_tokenizer,
        retriever=None if closed else retriever, variant=config.model.variant,
        n_docs=1 if closed else config.retrieval.n_docs, max_question_length=config.data.max_source_length,
        max_combined_length=config.data.max_combined_length, max_target_length=config.data.max_target_length,
        label_smoothing=config.train.label_smoothing, exclude_bos_score=config.train.exclude_bos_score,
        closed_book=closed, freeze_question_encoder=bool(config.train.freeze_question_encoder),
        kind=t.kind, answer_match=t.answer_match, labels=labels,
        length_buckets=length_buckets(config.data),
    )


def length_buckets(data: Any) -> dict[str, tuple[int, ...]] | None:
    """``RagTask.length_buckets`` from ``config.data`` (None: ``max_length`` padding)."""
    if data.padding != "bucket":
        return None
    return {"question": bucket_set(data.length_buckets, data.max_source_length),
            "context": bucket_set(data.length_buckets, data.max_combined_length),
            "target": bucket_set(data.length_buckets, data.max_target_length)}


def global_batch_size(config: Any, num_devices: int) -> int:
    gb = int(config.train.get("global_batch_size", 0) or 0)
    if not gb:
        # per_device_batch_size already counts every micro-batch (config_checks).
        return config.train.per_device_batch_size * num_devices
    return gb


def build_train_loader(config: Any, workdir: str | os.PathLike, global_batch: int,
                       positions: Sequence[int] | None = None) -> Any:
    """Endless shuffled training batches: positions ``positions`` of each
    global batch, the rows this process's devices hold (default: all).

    The TFDS dataset is built once for every process (``dataset_from_config``
    holds the others at a barrier while process 0 writes it).
    """
    if not config.data.train_file:
        raise ValueError("config.data.train_file is empty")
    return train_loader_from_config(config, dataset_from_config(config, workdir), global_batch, positions)


def optimizer(config: Any) -> tuple[Any, Any]:
    """(optax transformation, schedule) of a run: the question encoder is
    frozen for a frozen retriever and for closed-book runs (it is not used)."""
    frozen = ("question_encoder",) if (config.train.freeze_question_encoder or config.train.closed_book) else ()
    return optimizer_from_config(config.train, frozen=frozen)


def restore_params(config: Any, workdir: str | os.PathLike, models: Models) -> tuple[Any, int]:
    """Params of the newest verified checkpoint in ``workdir/checkpoints`` (host arrays).

    Restored into an explicit target on this process's first device, so a
    checkpoint written by any number of processes and devices loads here
    (orbax cannot place arrays on a topology it was not given).
    """
    tx, _ = optimizer(config)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.eval_shape(lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                                                   rng=jax.random.PRNGKey(0)), models.params)
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    ckpt = CheckpointManager(Path(workdir) / "checkpoints", every=config.checkpoint.every,
                             keep=config.checkpoint.keep, async_save=False)
    try:
        state, _, step = ckpt.restore(target=target)
    finally:
        ckpt.close()
    return jax.tree.map(np.asarray, state.params), step
