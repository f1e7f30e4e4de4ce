"""The resumable index build: passages -> corpus store -> document embeddings
(encoded or imported) -> ScaNN/exact index directory.

    manifest = build_index_dir("wiki/index", passages="psgs_w100.tsv", encoder=ctx_dir)

All work happens in ``OUT.work``: the corpus store (``corpus/``), the
embedding shards (``embeddings/``), then the searcher (``scann/``) and the
index manifest, written last. ``OUT.work`` then becomes ``OUT`` by one
rename, so ``OUT`` appears only when complete and a kill anywhere loses at
most the step in progress (one embedding shard, or the ScaNN build).

Every reused piece is checked against the inputs it was made from: the
passages file's fingerprint (size, mtime, sha256), the encoder's fingerprint,
the imported files' fingerprints and the options that change the result.
Anything made from other inputs is rebuilt, and the log says why. The index
manifest records them all under ``"build"``: re-running a finished build
prints so and returns its manifest instead of failing on the existing ``OUT``.

One writer at a time: ``OUT.lock`` names its holder; a second build of the
same ``OUT`` stops with one line, a lock left by a dead process is taken over.
Kill points for tests: :mod:`rag_jax.retrieval.faults`.
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Mapping

from rag_jax.encoder import load_encoder
from rag_jax.retrieval.corpus import (
    MANIFEST as CORPUS_MANIFEST,
    Corpus,
    CorpusError,
    build_corpus,
    commit_dir,
    content_change,
    file_fingerprint,
    input_warnings,
    same_content,
)
from rag_jax.retrieval.embeddings import STORE_MANIFEST, EmbeddingStore, import_embeddings
from rag_jax.retrieval.encode import encode_corpus
from rag_jax.retrieval.faults import fault_point
from rag_jax.retrieval.index import (
    BRUTE_FORCE_BELOW,
    INDEX_MANIFEST,
    ScannParams,
    check_pairing,
    unapplied_scann_overrides,
    write_index_files,
)
from rag_jax.retrieval.lock import WriterLock

# The parts of a file fingerprint that locate it or cache its hash: two
# builds with equal inputs may differ in them (a moved or touched file).
_NOT_CONTENT = ("path", "mtime_ns", "checked_ns")
_WORK_ENTRIES = ("corpus", "embeddings", "scann", INDEX_MANIFEST)


def _say(msg: str) -> None:
    print(f"[build-index] {msg}", flush=True)


def _warn(msg: str) -> None:
    print(f"[build-index] warning: {msg}", file=sys.stderr, flush=True)


def _content(x: Any) -> Any:
    """``x`` without the fingerprint fields that do not describe content (for comparisons)."""
    if isinstance(x, dict):
        return {k: _content(v) for k, v in x.items() if k not in _NOT_CONTENT}
    if isinstance(x, list):
        return [_content(v) for v in x]
    return x


def _flat(x: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(x, dict):
        out: dict[str, Any] = {}
        for k, v in x.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: x}


def _differences(old: Any, new: Any) -> str:
    """The first few dotted keys whose content differs, for one-line messages."""
    a, b = _flat(_content(old)), _flat(_content(new))
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    shown = ", ".join(f"{k}: {_short(a.get(k))} -> {_short(b.get(k))}" for k in keys[:3])
    return shown + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 24 else text[:20] + "...'"  # hashes: their start is enough to tell apart


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.is_file() else None


def _known_fingerprints(*manifests: Path) -> dict[str, dict]:
    """Earlier file fingerprints by absolute path, so unchanged files are not hashed again."""
    known: dict[str, dict] = {}

    def walk(x: Any) -> None:
        if isinstance(x, dict):
            if "sha256" in x and "path" in x:
                known[x["path"]] = x
            for v in x.values():
                walk(v)
        elif isinstance(x, list):
            for v in x:
                walk(v)

    for m in manifests:
        walk(_read_json(m))
    return known


def _clean_leftovers(out: Path, work: Path) -> None:
    """Removes what killed runs left behind (the lock is held: nothing else writes these)."""
    parent = out.parent
    # Temporary siblings: build_index's and older versions' ``.OUT.tmp-*``, and
    # ``.OUT.old-*``, the index an --overwrite commit was replacing when killed.
    olds = sorted(parent.glob(f".{out.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and not out.exists() and (olds[-1] / INDEX_MANIFEST).is_file():
        # Killed between the two renames of the commit: put the old index back;
        # the re-run replaces it again if it still has --overwrite.
        os.rename(olds.pop(), out)
        _say(f"restored {out} (a replacing build was killed while committing)")
    for p in olds + sorted(parent.glob(f".{out.name}.tmp-*")):
        _say(f"removing leftover temporary directory {p}")
        shutil.rmtree(p, ignore_errors=True)
    if not work.is_dir():
        return
    for p in work.iterdir():
        if p.name not in _WORK_ENTRIES:  # half-written stores, an import's scratch matrix
            _say(f"removing leftover {p}")
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:
                p.unlink()
    for p in (work / "embeddings").glob("*.partial"):
        p.unlink()


def _open_corpus(cdir: Path) -> tuple[Corpus | None, str]:
    """The corpus store in ``cdir``, or (None, why it cannot be used: "" when there is none)."""
    if not (cdir / CORPUS_MANIFEST).is_file():
        return None, ""
    try:
        return Corpus(cdir), ""
    except CorpusError as e:  # another version's format, say: rebuilt, never a dead end
        return None, str(e)


def _drop_staged_index(work: Path) -> None:
    """Forgets a finished searcher in the work dir: its inputs are about to be rebuilt."""
    (work / INDEX_MANIFEST).unlink(missing_ok=True)  # first: it is what marks the work dir complete
    shutil.rmtree(work / "scann", ignore_errors=True)


def _passages_reuse(cdir: Path, fingerprint: dict, split_words: int | None) -> tuple[Corpus | None, str]:
    """The work dir's corpus store if made from the same passages, else (None, why not)."""
    old, why = _open_corpus(cdir)
    if old is None:
        return None, why
    had = old.manifest.get("source_fingerprint")
    if not had:
        return None, f"{cdir} records no fingerprint of its passages file"
    if not same_content(had, fingerprint):
        return None, content_change(had, fingerprint)
    if old.manifest.get("split_words") != split_words:
        return None, f"--split-words {old.manifest.get('split_words')} -> {split_words}"
    return old, ""


def _import_reuse(edir: Path, corpus: Corpus, imported: dict, dtype: str, fingerprint: str | None) -> str | None:
    """None if ``edir`` holds this import of these files for ``corpus``, else why not ("" when empty)."""
    if not edir.exists():
        return ""
    m = _read_json(edir / STORE_MANIFEST)
    if not m:
        return f"{edir} is incomplete"
    if _content(m.get("inputs")) != _content(imported):
        return f"{edir} was imported from other files ({_differences(m.get('inputs'), imported)})"
    if m.get("corpus_checksum") != corpus.checksum:
        return f"{edir} was imported for another corpus"
    if (m.get("dtype"), m.get("encoder_fingerprint")) != (dtype, fingerprint):
        return f"{edir} has dtype {m.get('dtype')} / encoder {m.get('encoder_fingerprint')}"
    return None


def build_index_dir(
    out: str | os.PathLike,
    *,
    passages: str | os.PathLike | None = None,
    corpus: str | os.PathLike | None = None,
    split_words: int | None = None,
    encoder: str | os.PathLike | None = None,
    embeddings_pkl: str | None = None,
    embeddings_npy: str | os.PathLike | None = None,
    embeddings_ids: str | os.PathLike | None = None,
    batch_size: int = 64,
    max_length: int = 256,
    length_bucket: int | None = 64,
    shard_rows: int | None = None,
    dtype: str = "float32",
    token_types: str = "zeros",
    index_type: str = "scann",
    scann_params: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    strict: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Builds the index directory ``out`` and returns its manifest.

    The passages come from exactly one of ``passages`` (DPR TSV or JSONL file;
    ``split_words`` treats it as raw documents split into passages of that
    many words) or ``corpus`` (an existing corpus directory). The embeddings
    are encoded with ``encoder`` (a context encoder directory), or imported
    from exactly one of ``embeddings_pkl`` (a glob of DPR pickles) or
    ``embeddings_npy`` (with ``embeddings_ids``); with an import, a given
    ``encoder`` is only recorded (its fingerprint) in the manifest.
    ``scann_params`` overrides ScaNN's defaults (``ScannParams`` fields); one
    that the built index does not apply is reported, never recorded.
    ``strict`` makes empty passage texts and non-integer DPR TSV ids errors
    (otherwise warnings). An existing ``out`` built from the same inputs and
    options is returned as it is; any other existing ``out`` needs ``overwrite``.
    """
    out = Path(out)
    if bool(passages) == bool(corpus):
        raise ValueError("give exactly one of --passages FILE or --corpus DIR")
    imports = bool(embeddings_pkl) + bool(embeddings_npy)
    if imports > 1 or not (imports or encoder):
        raise ValueError("give --encoder (to encode), or one of --embeddings-pkl / --embeddings-npy "
                         "(to import; with --encoder too, its fingerprint is recorded in the manifest)")
    if index_type not in ("scann", "exact"):
        raise ValueError(f"index type must be 'scann' or 'exact', got {index_type!r}")
    work = out.with_name(out.name + ".work")
    with WriterLock(out.with_name(out.name + ".lock"), f"build-index --out {out}") as lock:
        if lock.took_over:
            _say(lock.took_over)
        _clean_leftovers(out, work)
        return _build_locked(
            out, work, passages=passages, corpus=corpus, split_words=split_words or None, encoder=encoder,
            embeddings_pkl=embeddings_pkl, embeddings_npy=embeddings_npy, embeddings_ids=embeddings_ids,
            encode_options={"batch_size": batch_size, "max_length": max_length, "length_bucket": length_bucket or None,
                            "shard_rows": shard_rows or None, "token_types": token_types},
            dtype=dtype, index_type=index_type,
            scann_overrides={k: v for k, v in (scann_params or {}).items() if v is not None},
            overwrite=overwrite, strict=strict, progress=progress,
        )


def _build_locked(
    out: Path,
    work: Path,
    *,
    passages: str | os.PathLike | None,
    corpus: str | os.PathLike | None,
    split_words: int | None,
    encoder: str | os.PathLike | None,
    embeddings_pkl: str | None,
    embeddings_npy: str | os.PathLike | None,
    embeddings_ids: str | os.PathLike | None,
    encode_options: dict[str, Any],
    dtype: str,
    index_type: str,
    scann_overrides: dict[str, Any],
    overwrite: bool,
    strict: bool,
    progress: bool,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    known = _known_fingerprints(out / INDEX_MANIFEST, work / INDEX_MANIFEST, work / "corpus" / CORPUS_MANIFEST,
                                work / "embeddings" / STORE_MANIFEST)

    def fingerprint_of(path: str | os.PathLike) -> dict:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
        return file_fingerprint(path, known.get(os.path.abspath(path)), progress=progress)

    # --- what this build is made from: the record every reuse is checked against
    passages_fp = fingerprint_of(passages) if passages is not None else None
    given_corpus = Corpus(corpus) if corpus else None
    loaded = load_encoder(encoder) if encoder else None
    encoder_fp = loaded.fingerprint() if loaded else None
    imported: dict[str, Any] | None = None
    if embeddings_npy:
        imported = {"npy": fingerprint_of(embeddings_npy),
                    "ids": fingerprint_of(embeddings_ids) if embeddings_ids else None}
    elif embeddings_pkl:
        files = sorted(glob.glob(embeddings_pkl))
        if not files:
            raise FileNotFoundError(f"no files match {embeddings_pkl!r}")
        imported = {"pkl": [fingerprint_of(f) for f in files]}
    record = {
        "passages": passages_fp,
        "split_words": split_words,
        "corpus": given_corpus.checksum if given_corpus else None,
        "embeddings": {"import": imported} if imported else dict(encode_options),
        "dtype": dtype,
        "encoder_fingerprint": encoder_fp,
        "index_type": index_type,
        "scann": scann_overrides if index_type == "scann" else None,
    }

    # --- an existing OUT: the same finished build is done, anything else needs --overwrite
    if out.exists() and not overwrite:
        have = _read_json(out / INDEX_MANIFEST)
        if have and _content(have.get("build")) == _content(record):
            if passages is not None and (out / "corpus" / CORPUS_MANIFEST).is_file():
                for w in input_warnings(Corpus(out / "corpus"), str(passages), strict):
                    _warn(w)
            _say(f"{out} is already built from the same inputs and options ({have['count']} passages); "
                 "nothing to do")
            return have
        why = (f"built from other inputs or options: {_differences(have.get('build'), record)}" if have.get("build")
               else "not built by this version of build-index" if have else "not an index directory")
        raise ValueError(f"{out} already exists ({why}); use --overwrite to replace it")
    work.mkdir(parents=True, exist_ok=True)

    # --- corpus store
    cdir = work / "corpus"
    if given_corpus is not None:
        copy, _ = _open_corpus(cdir)
        if copy is not None and copy.checksum == given_corpus.checksum:
            store_corpus = copy
            _say(f"reusing the copy of corpus {corpus} ({len(store_corpus)} passages)")
        else:
            _drop_staged_index(work)
            shutil.rmtree(cdir, ignore_errors=True)
            # The index carries its corpus; copy under another name so a kill leaves no half copy named corpus/.
            shutil.copytree(given_corpus.path, work / ".corpus.copy")
            os.rename(work / ".corpus.copy", cdir)
            store_corpus = Corpus(cdir)
    else:
        store_corpus, why = _passages_reuse(cdir, passages_fp, split_words)
        if store_corpus is not None:
            _say(f"reusing corpus store {cdir} ({len(store_corpus)} passages; {passages} unchanged)")
        else:
            if why:
                _say(f"rebuilding the corpus store: {why}")
            _drop_staged_index(work)
            shutil.rmtree(cdir, ignore_errors=True)
            t = time.perf_counter()
            store_corpus = build_corpus(passages, cdir, split_words=split_words, progress=progress, strict=strict,
                                        fingerprint=passages_fp)
            _say(f"corpus: {len(store_corpus)} passages ({time.perf_counter() - t:.1f}s)")
        for w in input_warnings(store_corpus, str(passages), strict):
            _warn(w)
    fault_point("corpus")

    # --- document embeddings
    edir = work / "embeddings"
    if imported is None:
        t = time.perf_counter()
        before = _mtime(edir / STORE_MANIFEST)
        resumed = any(edir.glob("shard-*.npy"))

        def restart(why: str) -> None:
            _say(f"re-encoding from scratch: {edir} holds another job ({why})")
            _drop_staged_index(work)

        store = encode_corpus(
            store_corpus, loaded, edir, encoder_fingerprint=encoder_fp, dtype=dtype, progress=progress,
            on_other_job=restart, **encode_options,
        )
        dt = time.perf_counter() - t
        if before is not None and before == _mtime(edir / STORE_MANIFEST):
            _say(f"reusing embedding store {edir} ({store.count} x {store.dim})")
        elif resumed:  # shards of an earlier run were kept (or dropped, if another job: logged above)
            _say(f"embeddings of {len(store_corpus)} passages ready in {dt:.1f}s")
        else:
            _say(f"encoded {len(store_corpus)} passages in {dt:.1f}s "
                 f"({len(store_corpus) / max(dt, 1e-9):.1f} passages/s)")
    else:
        why = _import_reuse(edir, store_corpus, imported, dtype, encoder_fp)
        if why is None:
            store = EmbeddingStore(edir)
            _say(f"reusing imported embedding store {edir}")
        else:
            if why:
                _say(f"importing again: {why}")
            _drop_staged_index(work)
            shutil.rmtree(edir, ignore_errors=True)
            store = import_embeddings(
                store_corpus, edir, dpr_pickles=embeddings_pkl, npy=embeddings_npy, ids=embeddings_ids,
                dtype=dtype, encoder_fingerprint=encoder_fp, progress=progress, inputs=imported,
            )
            _say(f"imported {store.count} x {store.dim} embeddings")
    check_pairing(store.count, store.corpus_checksum, store_corpus)
    fault_point("embeddings")

    # --- searcher and manifest, then the commit
    t = time.perf_counter()
    staged = _read_json(work / INDEX_MANIFEST)
    if (staged and _content(staged.get("build")) == _content(record)
            and (staged.get("corpus_checksum"), staged.get("count")) == (store_corpus.checksum, store.count)):
        manifest = staged  # finished before a kill that came ahead of the commit
        _say(f"reusing the finished index in {work}")
    else:
        _drop_staged_index(work)
        params = _scann_params(store.count, index_type, scann_overrides)
        manifest = write_index_files(work, index_type, encoder_fp, store_corpus.checksum, params,
                                     extra={"build": record})
        fault_point("index")
    commit_dir(work, out)
    fault_point("commit")
    _say(
        f"{index_type} index of {manifest['count']} x {manifest['dim']} in "
        f"{time.perf_counter() - t:.1f}s -> {out} (search structure "
        f"{manifest['search_bytes'] / max(manifest['count'], 1):.0f} bytes/passage; "
        f"total {time.perf_counter() - t0:.1f}s)"
    )
    return manifest


def _scann_params(count: int, index_type: str, overrides: dict[str, Any]) -> ScannParams | None:
    """The ScaNN parameters to build with; warns about every requested one that is not applied."""
    flags = {k: f"--{k.replace('_', '-')} {v}" for k, v in overrides.items()}
    if index_type != "scann":
        if flags:
            _warn(f"{', '.join(flags.values())}: ScaNN options, not applied to --index-type {index_type}")
        return None
    params = ScannParams.for_size(count, **overrides)
    unapplied = unapplied_scann_overrides(params, overrides)
    if unapplied:
        why = ("ScaNN brute force does not use them"
               + (f" ({count} passages < {BRUTE_FORCE_BELOW:,} default to brute force; --no-brute-force "
                  "builds a tree)" if "brute_force" not in overrides else ""))
        _warn(f"{', '.join(flags[k] for k in unapplied)}: not applied ({why}); the manifest records "
              "the values used")
    return params
