"""``rag-jax build-index`` and ``rag-jax search`` (registered by ``rag_jax.cli``)."""
from __future__ import annotations

import argparse
import json
import sys

from rag_jax.cli_train import add_distributed_arguments


def add_build_index_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "build-index",
        help="passages -> corpus store -> document embeddings -> ScaNN/exact index directory (or a BM25 one)",
        description=(
            "Builds a retrieval index directory from a passages file. Intermediate work (corpus store, "
            "embedding shards) lives in OUT.work and is resumed if the command is killed and re-run, as far "
            "as it was made from the same inputs (passages file content, encoder, options); OUT appears only "
            "when complete, and re-running a finished build does nothing. OUT.lock keeps a second build of the "
            "same OUT out. Started as N jax processes (--coordinator_address/--num_processes/--process_id, "
            "the JAX_* variables, or --multihost), each encodes its share of the embedding shards into the "
            "same OUT.work (a file system all of them see); process 0 builds the corpus store and the index."
        ),
    )
    src = p.add_argument_group("passages")
    src.add_argument("--passages", help="DPR TSV (id, text, title; header; quoted text) or JSONL {id, title, text}")
    src.add_argument("--corpus", help="an existing corpus directory (instead of --passages)")
    src.add_argument("--split-words", type=int, default=0,
                     help="treat the file as raw documents and split them into passages of N words (DPR: 100)")
    src.add_argument("--strict", action="store_true",
                     help="fail on passages with an empty text or (DPR TSV) a non-integer id instead of warning")
    emb = p.add_argument_group("embeddings (encode with --encoder, or import precomputed ones)")
    emb.add_argument("--encoder", help="document (context) encoder directory: HF DPRContextEncoder or BERT")
    emb.add_argument("--embeddings-pkl", help="glob of DPR wikipedia_passages_*.pkl (id, vector) shards to import")
    emb.add_argument("--embeddings-npy", help="[N, D] .npy array to import (with --embeddings-ids)")
    emb.add_argument("--embeddings-ids", help="ids of the .npy rows: text file (one per line), .json or .npy list")
    emb.add_argument("--batch-size", type=int, default=64,
                     help="passages encoded at once by each process, split over its devices (padded to a "
                          "multiple of their number)")
    emb.add_argument("--max-length", type=int, default=256, help="passage token length ([CLS] title [SEP] text [SEP])")
    emb.add_argument("--length-bucket", type=int, default=64,
                     help="pad each batch to a multiple of this above its longest passage (0: always --max-length)")
    emb.add_argument("--shard-rows", type=int, default=0, help="rows per embedding shard (default 64 batches)")
    emb.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                     help="storage dtype of the document embeddings")
    emb.add_argument("--token-types", choices=["zeros", "pair"], default="zeros",
                     help="segment ids fed to the encoder: all zeros (DPR, HF RAG) or 0/1 per pair member")
    idx = p.add_argument_group("index")
    idx.add_argument("--out", required=True, help="index directory to create")
    idx.add_argument("--index-type", choices=["scann", "exact", "bm25"], default="scann",
                     help="bm25: a sparse BM25 index of the passages' words (bm25s; no encoder or embeddings)")
    idx.add_argument("--num-leaves", type=int, help="ScaNN tree leaves (default ~sqrt(N))")
    idx.add_argument("--num-leaves-to-search", type=int, help="ScaNN leaves searched per query (default ~5%%)")
    idx.add_argument("--reorder-k", type=int, help="ScaNN candidates re-scored exactly (default 200)")
    idx.add_argument("--reorder-dtype", choices=["memmap", "int8", "bfloat16", "float32", "none"],
                     help="ScaNN re-ordering vectors: memmap (default: exact re-scoring from the memory-mapped "
                          "float32 store, only hashed codes resident), int8/bfloat16/float32 (a copy in RAM), none")
    idx.add_argument("--training-sample-size", type=int, help="ScaNN k-means/AH training sample")
    idx.add_argument("--brute-force", action=argparse.BooleanOptionalAction, default=None,
                     help="ScaNN brute force (default below 20,000 passages; the tree options need a tree)")
    tt = p.add_argument_group("passage token table for retrieval.on_device (otherwise built when training starts)")
    tt.add_argument("--token-table", metavar="GENERATOR_DIR",
                    help="also tokenize the passages with this generator's tokenizer into OUT/passage_tokens/")
    tt.add_argument("--max-combined-length", type=int, default=300, help="as config.data.max_combined_length")
    tt.add_argument("--title-sep", default=" / ", help="as the RAG config's title_sep")
    tt.add_argument("--doc-sep", default=" // ", help="as the RAG config's doc_sep")
    tt.add_argument("--prefix", default=None, help="as the generator config's prefix")
    bm = p.add_argument_group("BM25 (--index-type bm25; see rag_jax/retrieval/bm25.py)")
    bm.add_argument("--bm25-k1", type=float, default=0.9, help="term-frequency saturation (default: DPR's 0.9)")
    bm.add_argument("--bm25-b", type=float, default=0.4, help="length normalisation (default: DPR's 0.4)")
    bm.add_argument("--bm25-method", choices=["lucene", "robertson", "atire"], default="lucene",
                    help="bm25s's BM25 variant (default lucene: idf ln(1 + (N - df + .5)/(df + .5)))")
    bm.add_argument("--bm25-stemmer", choices=["porter", "none"], default="porter")
    bm.add_argument("--bm25-stopwords", choices=["english", "none"], default="english")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_distributed_arguments(p)
    p.add_argument("--multihost", action="store_true",
                   help="without the three flags above: let jax detect the processes (TPU pod slice, SLURM, "
                        "Open MPI)")
    p.set_defaults(func=run_build_index)


def run_build_index(args: argparse.Namespace) -> int:
    from rag_jax.train.distributed import initialize

    # Before any other jax use; a no-op without the flags, variables or --multihost.
    initialize(args.coordinator_address, args.num_processes, args.process_id, multihost=args.multihost)
    from rag_jax.retrieval.build import build_index_dir

    scann = {
        "num_leaves": args.num_leaves, "num_leaves_to_search": args.num_leaves_to_search,
        "reorder_k": args.reorder_k, "reorder_dtype": args.reorder_dtype,
        "training_sample_size": args.training_sample_size, "brute_force": args.brute_force,
    }
    build_index_dir(
        args.out, passages=args.passages, corpus=args.corpus, split_words=args.split_words,
        encoder=args.encoder, embeddings_pkl=args.embeddings_pkl, embeddings_npy=args.embeddings_npy,
        embeddings_ids=args.embeddings_ids, batch_size=args.batch_size, max_length=args.max_length,
        length_bucket=args.length_bucket, shard_rows=args.shard_rows, dtype=args.dtype,
        token_types=args.token_types, index_type=args.index_type,
        scann_params={k: v for k, v in scann.items() if v is not None},  # unset flags keep ScaNN's defaults
        bm25_params={"k1": args.bm25_k1, "b": args.bm25_b, "method": args.bm25_method,
                     "stemmer": args.bm25_stemmer, "stopwords": args.bm25_stopwords},
        overwrite=args.overwrite, strict=args.strict, progress=not args.no_progress,
    )
    if args.token_table:
        from rag_jax.retrieval.token_table import ContextFormat, ensure_index_table

        fmt = ContextFormat(args.prefix, args.title_sep, args.doc_sep, args.max_combined_length)
        table = ensure_index_table(args.out, args.token_table, fmt, progress=not args.no_progress)
        print(f"passage token table: {table.path} ({table.count} rows x {table.width} tokens)")
    return 0


def add_search_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("search", help="top-k passages for questions from an index directory")
    p.add_argument("questions", nargs="+", help="one or more questions")
    p.add_argument("--index", required=True, help="index directory from build-index (dense, or BM25)")
    p.add_argument("--encoder", help="question encoder directory (HF DPRQuestionEncoder or BERT); "
                                     "not needed with a BM25 --index")
    p.add_argument("--bm25-index", help="a BM25 index of the same corpus: hybrid search, fused with --fusion")
    p.add_argument("--fusion", choices=["rrf", "score"], default="rrf",
                   help="hybrid fusion: reciprocal rank (default) or normalised scores")
    p.add_argument("--rrf-k", type=float, default=60.0, help="reciprocal-rank fusion constant")
    p.add_argument("--fusion-weight", type=float, default=0.5, help="score fusion: weight of the dense side")
    p.add_argument("--fusion-depth", type=int, default=100, help="candidates taken from each side")
    p.add_argument("--corpus", help="corpus directory, if not inside the index")
    p.add_argument("-k", type=int, default=5, help="passages per question")
    p.add_argument("--max-length", type=int, default=64, help="question token length")
    p.add_argument("--json", action="store_true", help="print one JSON object per question")
    p.set_defaults(func=run_search)


def run_search(args: argparse.Namespace) -> int:
    import rag_jax
    from rag_jax.rag.inputs import retrieve_contexts
    from rag_jax.retrieval.fusion import Fusion
    from rag_jax.retrieval.retriever import Retriever

    fusion = Fusion(args.fusion, args.rrf_k, args.fusion_weight, args.fusion_depth)
    retriever = Retriever(args.index, corpus=args.corpus, bm25=args.bm25_index, fusion=fusion)
    if not retriever.needs_vectors:  # BM25 alone: words in, no question encoder
        got = retriever.retrieve(None, args.k, questions=args.questions)
        ids, titles, texts, scores = got.ids, got.titles, got.texts, got.scores
    else:
        if not args.encoder:
            raise ValueError(f"--encoder is required: {args.index} is a dense index")
        encoder = rag_jax.load_encoder(args.encoder)
        if encoder.dim != retriever.index.dim:
            raise ValueError(f"question encoder dimension {encoder.dim} != index dimension {retriever.index.dim}")
        if encoder.tokenizer is None:
            raise ValueError(f"{args.encoder}: no tokenizer files (vocab.txt / tokenizer.json)")
        # The retrieval half of the training/inference path; no generator, so no contexts.
        res = retrieve_contexts(
            args.questions, question_config=encoder.config, question_params=encoder.params,
            question_tokenizer=encoder.tokenizer, retriever=retriever, n_docs=args.k,
            max_question_length=args.max_length,
        )
        ids, titles, texts, scores = res.ids, res.titles, res.texts, res.doc_scores
    for i, question in enumerate(args.questions):
        if args.json:
            hits = [
                {"id": str(ids[i, j]), "title": titles[i][j], "score": float(scores[i, j]),
                 "text": texts[i][j]}
                for j in range(args.k)
            ]
            print(json.dumps({"question": question, "hits": hits}, ensure_ascii=False))
            continue
        print(f"Q: {question}")
        for j in range(args.k):
            text = texts[i][j]
            snippet = text if len(text) <= 100 else text[:97] + "..."
            print(f"  {j + 1:2d}. id={ids[i, j]}  score={scores[i, j]:.4f}  {titles[i][j]}  |  {snippet}")
    sys.stdout.flush()
    return 0
