"""The resumable index build: passages -> corpus store -> document embeddings
(encoded or imported) -> ScaNN/exact index directory; or passages -> corpus
store -> BM25 index directory (``index_type="bm25"``: no encoder, no
embeddings; the same fingerprints, work dir, lock and commit).

    manifest = build_index_dir("wiki/index", passages="psgs_w100.tsv", encoder=ctx_dir)
    manifest = build_index_dir("wiki/bm25", passages="psgs_w100.tsv", index_type="bm25")

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

Run as N jax processes (``jax.distributed`` joined before the call), the
build is one job: process 0 takes the lock, builds the corpus store and
prepares the embedding directory while the others wait; then every process
encodes its share of the missing shards on its own devices (shared file
system); process 0 waits for all shares, then writes the embedding manifest
and the index. Only process 0 prints. The result is the 1-process build's
(same devices per process: same bytes), and a killed N-process build resumes
under any process count.
"""
from __future__ import annotations

import contextlib
import glob
import itertools
import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import jax

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
from rag_jax.retrieval.bm25 import Bm25Params
from rag_jax.retrieval.embeddings import STORE_MANIFEST, EmbeddingStore, import_embeddings
from rag_jax.retrieval.encode import EncodingJob, encode_shards, finish_job, start_job
from rag_jax.retrieval.faults import fault_point
from rag_jax.retrieval.index import (
    BRUTE_FORCE_BELOW,
    INDEX_MANIFEST,
    INDEX_KINDS,
    ScannParams,
    check_pairing,
    unapplied_scann_overrides,
    write_bm25_index_files,
    write_index_files,
)
from rag_jax.retrieval.lock import WriterLock

# The parts of a file fingerprint that locate it or cache its hash: two
# builds with equal inputs may differ in them (a moved or touched file).
_NOT_CONTENT = ("path", "mtime_ns", "checked_ns")
_WORK_ENTRIES = ("corpus", "embeddings", "scann", "bm25", INDEX_MANIFEST)


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
    shutil.rmtree(work / "bm25", ignore_errors=True)


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
    bm25_params: Mapping[str, Any] | None = None,
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
    ``index_type="bm25"`` builds a BM25 index of the corpus store instead
    (``bm25_params``: ``Bm25Params`` fields), with no encoder or embeddings.
    ``strict`` makes empty passage texts and non-integer DPR TSV ids errors
    (otherwise warnings). An existing ``out`` built from the same inputs and
    options is returned as it is; any other existing ``out`` needs ``overwrite``.

    In a multi-process jax run, call it in every process with the same
    arguments: ``out`` must be on a file system all of them see. Each
    returns the manifest; process 0 alone prints, holds ``OUT.lock`` (for
    the whole team) and writes everything but the embedding shards. One
    ``batch_size`` batch is split over a process's own devices.
    """
    out = Path(out)
    if bool(passages) == bool(corpus):
        raise ValueError("give exactly one of --passages FILE or --corpus DIR")
    imports = bool(embeddings_pkl) + bool(embeddings_npy)
    if index_type not in INDEX_KINDS:
        raise ValueError(f"index type must be one of {INDEX_KINDS}, got {index_type!r}")
    if index_type == "bm25":
        if imports or encoder:
            raise ValueError("--index-type bm25 indexes the passages' words: --encoder / --embeddings-pkl / "
                             "--embeddings-npy are not used; leave them out")
    elif imports > 1 or not (imports or encoder):
        raise ValueError("give --encoder (to encode), or one of --embeddings-pkl / --embeddings-npy "
                         "(to import; with --encoder too, its fingerprint is recorded in the manifest)")
    bm25 = Bm25Params(**(bm25_params or {})) if index_type == "bm25" else None
    work = out.with_name(out.name + ".work")
    team = _Team()
    if not team.lead:
        return _follow(team, out, work, encoder)
    what = f"build-index --out {out}" + (f" ({team.count} processes)" if team.count > 1 else "")
    lock = WriterLock(out.with_name(out.name + ".lock"), what)
    inputs = _Inputs(
        passages=passages, corpus=corpus, split_words=split_words or None, encoder=encoder,
        embeddings_pkl=embeddings_pkl, embeddings_npy=embeddings_npy, embeddings_ids=embeddings_ids,
        encode_options={"batch_size": batch_size, "max_length": max_length, "length_bucket": length_bucket or None,
                        "shard_rows": shard_rows or None, "token_types": token_types},
        dtype=dtype, index_type=index_type, bm25=bm25,
        scann_overrides={k: v for k, v in (scann_params or {}).items() if v is not None},
        overwrite=overwrite, strict=strict, progress=progress,
    )
    try:
        with team.reporting("prepared"):
            lock.acquire()
            if lock.took_over:
                _say(lock.took_over)
            _clean_leftovers(out, work)
            prepared = _prepare(out, work, inputs)
        if isinstance(prepared, dict):  # OUT is this build, finished earlier
            team.post("prepared", {"done": True})
            return prepared
        team.post("prepared", {"done": False, "missing": prepared.missing})
        with team.reporting("finished"):
            _encode_lead_share(team, prepared, work, progress)
            manifest = _finish(prepared, out, work, inputs)
        team.post("finished", {})
        return manifest
    finally:
        lock.release()


# Each wait on another process is cut into pieces this long: no phase has an
# upper bound (one host may encode for days), and a peer that dies ends the
# wait with the coordination service's error, not with this timeout.
_WAIT_PIECE_MS = 10 * 60 * 1000


class TeamError(ValueError):
    """Another process of the same build failed; the message names it and its error."""


class _Team:
    """The processes of one build and the few messages they exchange.

    Messages go through the key-value store of jax's coordination service
    (which ``jax.distributed.initialize`` started), not through device
    collectives (``multihost_utils``): measured on CPU, a gloo collective
    whose processes arrive more than 30 s apart fails with DEADLINE_EXCEEDED,
    and here the others wait while process 0 builds a corpus store or an
    index (minutes to an hour). In a 1-process run nothing is sent.
    """

    _builds = itertools.count()  # successive builds of one session use their own keys

    def __init__(self) -> None:
        self.index, self.count = jax.process_index(), jax.process_count()
        self._prefix = f"rag_jax/build-index/{next(self._builds)}"
        self._client: Any = None
        if self.count > 1:
            from jax._src import distributed  # the client jax.distributed.initialize made; no public accessor

            self._client = distributed.global_state.client

    @property
    def lead(self) -> bool:
        return self.index == 0

    def post(self, name: str, message: dict) -> None:
        if self._client is not None:
            self._client.key_value_set(f"{self._prefix}/{name}", json.dumps(message))

    def wait(self, name: str) -> dict:
        key = f"{self._prefix}/{name}"
        while True:
            try:
                return json.loads(self._client.blocking_key_value_get(key, _WAIT_PIECE_MS))
            except jax.errors.JaxRuntimeError as e:
                if "DEADLINE_EXCEEDED" not in str(e):
                    raise

    @contextlib.contextmanager
    def reporting(self, name: str) -> Iterator[None]:
        """A context in which an error is first posted as message ``name`` (so no process waits
        for it in vain), then raised."""
        try:
            yield
        except BaseException as error:
            text = str(error).strip()
            self.post(name, {"error": text.splitlines()[0] if text else type(error).__name__})
            raise


def _follow(team: _Team, out: Path, work: Path, encoder: str | os.PathLike | None) -> dict[str, Any]:
    """A process other than 0: waits for the preparation, encodes its share, waits for the index."""
    msg = team.wait("prepared")
    if "error" in msg:
        raise TeamError(f"process 0 stopped the build: {msg['error']}")
    if not msg["done"]:
        mine = msg["missing"][team.index::team.count]
        with team.reporting(f"encoded/{team.index}"):
            if mine:
                edir = work / "embeddings"
                encode_shards(Corpus(work / "corpus"), load_encoder(encoder), edir, EncodingJob.read(edir), mine,
                              progress=False)
        team.post(f"encoded/{team.index}", {})
        msg = team.wait("finished")
        if "error" in msg:
            raise TeamError(f"process 0 stopped the build: {msg['error']}")
    return _read_json(out / INDEX_MANIFEST)


@dataclass(frozen=True)
class _Inputs:
    """build_index_dir's arguments, as process 0 uses them."""

    passages: str | os.PathLike | None
    corpus: str | os.PathLike | None
    split_words: int | None
    encoder: str | os.PathLike | None
    embeddings_pkl: str | None
    embeddings_npy: str | os.PathLike | None
    embeddings_ids: str | os.PathLike | None
    encode_options: dict[str, Any]
    dtype: str
    index_type: str
    bm25: Bm25Params | None
    scann_overrides: dict[str, Any]
    overwrite: bool
    strict: bool
    progress: bool


@dataclass
class _Prepared:
    """Process 0's work before the encoding: what the build is made from and what is left to do."""

    record: dict[str, Any]
    corpus: Corpus
    encoder: Any  # the loaded encoder; None when importing without --encoder
    job: EncodingJob | None  # None: the embeddings were imported into ``store``
    store: EmbeddingStore | None
    missing: list[int]  # shards still to encode
    manifest_mtime: int | None  # the embedding manifest's before this run (unchanged: the store was reused)
    resumed: bool  # shards of an earlier run were there
    t0: float
    t_embed: float = 0.0


def _prepare(out: Path, work: Path, inputs: _Inputs) -> dict[str, Any] | _Prepared:
    """Process 0, holding the lock: the record of the inputs, the corpus store and the embedding
    directory made ready; or OUT's manifest if OUT is this very build, finished."""
    t0 = time.perf_counter()
    progress = inputs.progress
    known = _known_fingerprints(out / INDEX_MANIFEST, work / INDEX_MANIFEST, work / "corpus" / CORPUS_MANIFEST,
                                work / "embeddings" / STORE_MANIFEST)

    def fingerprint_of(path: str | os.PathLike) -> dict:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such file")
        return file_fingerprint(path, known.get(os.path.abspath(path)), progress=progress)

    # --- what this build is made from: the record every reuse is checked against
    passages, embeddings_pkl, embeddings_npy = inputs.passages, inputs.embeddings_pkl, inputs.embeddings_npy
    passages_fp = fingerprint_of(passages) if passages is not None else None
    given_corpus = Corpus(inputs.corpus) if inputs.corpus else None
    loaded = load_encoder(inputs.encoder) if inputs.encoder else None
    encoder_fp = loaded.fingerprint() if loaded else None
    imported: dict[str, Any] | None = None
    if embeddings_npy:
        imported = {"npy": fingerprint_of(embeddings_npy),
                    "ids": fingerprint_of(inputs.embeddings_ids) if inputs.embeddings_ids else None}
    elif embeddings_pkl:
        files = sorted(glob.glob(embeddings_pkl))
        if not files:
            raise FileNotFoundError(f"no files match {embeddings_pkl!r}")
        imported = {"pkl": [fingerprint_of(f) for f in files]}
    record = {
        "passages": passages_fp,
        "split_words": inputs.split_words,
        "corpus": given_corpus.checksum if given_corpus else None,
        "embeddings": {"import": imported} if imported else dict(inputs.encode_options),
        "dtype": inputs.dtype,
        "encoder_fingerprint": encoder_fp,
        "index_type": inputs.index_type,
        "scann": inputs.scann_overrides if inputs.index_type == "scann" else None,
    }
    if inputs.bm25 is not None:  # nothing is encoded: the embedding options do not describe this build
        record.update(embeddings=None, dtype=None, bm25=asdict(inputs.bm25))

    # --- an existing OUT: the same finished build is done, anything else needs --overwrite
    if out.exists() and not inputs.overwrite:
        have = _read_json(out / INDEX_MANIFEST)
        if have and _content(have.get("build")) == _content(record):
            if passages is not None and (out / "corpus" / CORPUS_MANIFEST).is_file():
                for w in input_warnings(Corpus(out / "corpus"), str(passages), inputs.strict):
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
            _say(f"reusing the copy of corpus {inputs.corpus} ({len(store_corpus)} passages)")
        else:
            _drop_staged_index(work)
            shutil.rmtree(cdir, ignore_errors=True)
            # The index carries its corpus; copy under another name so a kill leaves no half copy named corpus/.
            shutil.copytree(given_corpus.path, work / ".corpus.copy")
            os.rename(work / ".corpus.copy", cdir)
            store_corpus = Corpus(cdir)
    else:
        store_corpus, why = _passages_reuse(cdir, passages_fp, inputs.split_words)
        if store_corpus is not None:
            _say(f"reusing corpus store {cdir} ({len(store_corpus)} passages; {passages} unchanged)")
        else:
            if why:
                _say(f"rebuilding the corpus store: {why}")
            _drop_staged_index(work)
            shutil.rmtree(cdir, ignore_errors=True)
            t = time.perf_counter()
            store_corpus = build_corpus(passages, cdir, split_words=inputs.split_words, progress=progress,
                                        strict=inputs.strict, fingerprint=passages_fp)
            _say(f"corpus: {len(store_corpus)} passages ({time.perf_counter() - t:.1f}s)")
        for w in input_warnings(store_corpus, str(passages), inputs.strict):
            _warn(w)
    fault_point("corpus")
    if inputs.bm25 is not None:  # no embeddings: the BM25 index is built from the corpus store in _finish
        shutil.rmtree(work / "embeddings", ignore_errors=True)  # a dense build's, killed in this work dir
        return _Prepared(record, store_corpus, None, None, None, [], None, False, t0, time.perf_counter())

    # --- the embedding directory: the encoding job made ready (shards left to encode), or the import done
    edir = work / "embeddings"
    prepared = _Prepared(record, store_corpus, loaded, None, None, [], _mtime(edir / STORE_MANIFEST),
                         any(edir.glob("shard-*.npy")), t0, time.perf_counter())
    if imported is None:

        def restart(why: str) -> None:
            _say(f"re-encoding from scratch: {edir} holds another job ({why})")
            _drop_staged_index(work)

        prepared.job = EncodingJob.for_corpus(store_corpus, encoder_fingerprint=encoder_fp, dtype=inputs.dtype,
                                              **inputs.encode_options)
        prepared.missing = start_job(edir, prepared.job, on_other_job=restart)
        return prepared
    why = _import_reuse(edir, store_corpus, imported, inputs.dtype, encoder_fp)
    if why is None:
        prepared.store = EmbeddingStore(edir)
        _say(f"reusing imported embedding store {edir}")
    else:
        if why:
            _say(f"importing again: {why}")
        _drop_staged_index(work)
        shutil.rmtree(edir, ignore_errors=True)
        prepared.store = import_embeddings(
            store_corpus, edir, dpr_pickles=embeddings_pkl, npy=embeddings_npy, ids=inputs.embeddings_ids,
            dtype=inputs.dtype, encoder_fingerprint=encoder_fp, progress=progress, inputs=imported,
        )
        _say(f"imported {prepared.store.count} x {prepared.store.dim} embeddings")
    return prepared


def _encode_lead_share(team: _Team, prepared: _Prepared, work: Path, progress: bool) -> None:
    """Process 0 encodes its share of the missing shards, then waits for the others' shares.

    Shares are the missing shards dealt round-robin (process p takes the
    p-th, (p+N)-th, ...): equal work whatever an earlier run finished, and
    the shards complete roughly in order, so a kill leaves few gaps.
    """
    job, missing = prepared.job, prepared.missing
    if job is None or not missing:
        return
    mine = missing[::team.count]
    if team.count == 1:
        desc, done = "encode", job.count - sum(job.rows_in(s) for s in missing)
    else:
        desc, done = f"encode (process 0's {len(mine)} of {len(missing)} shards)", 0
        _say(f"encoding {len(missing)} shards with {team.count} processes")
    if mine:
        encode_shards(prepared.corpus, prepared.encoder, work / "embeddings", job, mine, progress=progress,
                      progress_desc=desc, progress_done=done)
    if team.count > 1:
        _say(f"process 0 encoded its shards; waiting for the other {team.count - 1} process(es)")
    for p in range(1, team.count):
        msg = team.wait(f"encoded/{p}")
        if "error" in msg:
            raise TeamError(f"process {p} failed while encoding: {msg['error']}")


def _finish(prepared: _Prepared, out: Path, work: Path, inputs: _Inputs) -> dict[str, Any]:
    """Process 0, every shard encoded: the embedding manifest, the searcher and the commit."""
    if inputs.bm25 is not None:
        return _finish_bm25(prepared, out, work, inputs)
    edir = work / "embeddings"
    store_corpus = prepared.corpus
    if prepared.job is not None:
        store = finish_job(edir, prepared.job)
        dt = time.perf_counter() - prepared.t_embed
        if prepared.manifest_mtime is not None and prepared.manifest_mtime == _mtime(edir / STORE_MANIFEST):
            _say(f"reusing embedding store {edir} ({store.count} x {store.dim})")
        elif prepared.resumed:  # shards of an earlier run were kept (or dropped, if another job: logged above)
            _say(f"embeddings of {len(store_corpus)} passages ready in {dt:.1f}s")
        else:
            _say(f"encoded {len(store_corpus)} passages in {dt:.1f}s "
                 f"({len(store_corpus) / max(dt, 1e-9):.1f} passages/s)")
    else:
        assert prepared.store is not None
        store = prepared.store
    check_pairing(store.count, store.corpus_checksum, store_corpus)
    fault_point("embeddings")

    # --- searcher and manifest, then the commit
    t = time.perf_counter()
    record = prepared.record
    staged = _read_json(work / INDEX_MANIFEST)
    if (staged and _content(staged.get("build")) == _content(record)
            and (staged.get("corpus_checksum"), staged.get("count")) == (store_corpus.checksum, store.count)):
        manifest = staged  # finished before a kill that came ahead of the commit
        _say(f"reusing the finished index in {work}")
    else:
        _drop_staged_index(work)
        params = _scann_params(store.count, inputs.index_type, inputs.scann_overrides)
        manifest = write_index_files(work, inputs.index_type, record["encoder_fingerprint"], store_corpus.checksum,
                                     params, extra={"build": record})
        fault_point("index")
    commit_dir(work, out)
    fault_point("commit")
    _say(
        f"{inputs.index_type} index of {manifest['count']} x {manifest['dim']} in "
        f"{time.perf_counter() - t:.1f}s -> {out} (search structure "
        f"{manifest['search_bytes'] / max(manifest['count'], 1):.0f} bytes/passage; "
        f"total {time.perf_counter() - prepared.t0:.1f}s)"
    )
    return manifest


def _finish_bm25(prepared: _Prepared, out: Path, work: Path, inputs: _Inputs) -> dict[str, Any]:
    """Process 0: the BM25 index of the corpus store, its manifest and the commit."""
    assert inputs.bm25 is not None
    _scann_params(len(prepared.corpus), "bm25", inputs.scann_overrides)  # warns about ScaNN flags given
    t = time.perf_counter()
    corpus = prepared.corpus
    staged = _read_json(work / INDEX_MANIFEST)
    if (staged and _content(staged.get("build")) == _content(prepared.record)
            and (staged.get("corpus_checksum"), staged.get("count")) == (corpus.checksum, len(corpus))):
        manifest = staged  # finished before a kill that came ahead of the commit
        _say(f"reusing the finished index in {work}")
    else:
        _drop_staged_index(work)
        manifest = write_bm25_index_files(work, corpus, inputs.bm25, progress=inputs.progress,
                                          extra={"build": prepared.record})
        fault_point("index")
    commit_dir(work, out)
    fault_point("commit")
    _say(
        f"bm25 index of {manifest['count']} passages in {time.perf_counter() - t:.1f}s -> {out} "
        f"({manifest['search_bytes'] / max(manifest['count'], 1):.0f} bytes/passage; "
        f"total {time.perf_counter() - prepared.t0:.1f}s)"
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
