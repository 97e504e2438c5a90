"""The prep engine: competition TSV files -> validated, sharded TFRecords, vocabulary, word2vec.

The main process streams each TSV once, cutting it into chunks of lines (tsv.iter_chunks);
chunk k becomes shard k, written by a worker (data_prep.worker.process_chunk). Workers read
their chunk's bytes themselves, so only chunk locations travel between processes and at most
2 x workers chunks are in flight. When every shard is done, `finalize` gathers the sidecars
into the vocabulary, word2vec, the reject files and the manifest (written last; read back
with data_prep.manifest.PrepDir).

With shard_index i and num_shards n a machine does only the chunks k with k % n == i and
writes a partial manifest; data_prep.merge then finalizes.

`mmrecall prep` (data_prep/prep.py) is the command line over `run`.
"""
import collections
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
from typing import Dict, FrozenSet, List, Optional, Tuple

from tqdm import tqdm

from data_prep import schema, shards, text, tsv, vocab, word2vec, worker

REJECTS_DIR = "rejects"
ANSWERS_STATE = f"{shards.STATE_DIR}/valid.answers.json"
PARTIAL_MANIFEST = "manifest.part-{index:05d}-of-{count:05d}.json"
EXAMPLES_SHOWN = 5  # examples listed in a warning or a summary
_WORKER_START_TIMEOUT_S = 600


class PrepError(Exception):
    """A problem with the inputs or options that stops the job (message names the file)."""


@dataclasses.dataclass(frozen=True)
class PrepOptions:
    """The whole configuration of a prep run (`mmrecall prep` builds it from its flags)."""
    out: str
    train: Optional[str] = None
    valid: Optional[str] = None
    valid_answers: Optional[str] = None
    test: Optional[str] = None
    workers: int = 1
    rows_per_shard: int = 2048
    max_boxes: int = 32
    min_count: int = 1
    embedding_dim: int = 64
    w2v_epochs: int = 5
    gzip: bool = False
    keep_leading_be: bool = False
    shard_index: int = 0
    num_shards: int = 1
    progress: bool = True

    def inputs(self) -> List[Tuple[str, str]]:
        """[(split, TSV path)] of the splits given, in schema.SPLITS order."""
        given = {"train": self.train, "valid": self.valid, "test": self.test}
        return [(s, given[s]) for s in schema.SPLITS if given[s]]

    def settings(self) -> dict:
        """The options that shape the outputs (recorded in partial manifests for merge)."""
        keys = ("rows_per_shard", "max_boxes", "min_count", "embedding_dim", "w2v_epochs",
                "gzip", "keep_leading_be")
        return {k: getattr(self, k) for k in keys}

    def validate(self) -> None:
        """Raises PrepError for inconsistent options or missing input files."""
        if not self.inputs():
            raise PrepError("nothing to do: give at least one of --train, --valid, --test")
        if bool(self.valid) != bool(self.valid_answers):
            raise PrepError("--valid and --valid-answers go together")
        for name in ("workers", "rows_per_shard", "max_boxes", "min_count", "embedding_dim",
                     "w2v_epochs", "num_shards"):
            if getattr(self, name) < 1:
                raise PrepError(f"--{name.replace('_', '-')} must be >= 1, got "
                                f"{getattr(self, name)}")
        if not 0 <= self.shard_index < self.num_shards:
            raise PrepError(f"--shard-index must be in 0..{self.num_shards - 1}, got "
                            f"{self.shard_index}")
        for path in [p for _, p in self.inputs()] + [self.valid_answers]:
            if path and not os.path.isfile(path):
                raise PrepError(f"{path}: no such file")


# ---------------------------------------------------------------------------------------
# Answers.
def load_answers(path: str) -> Dict[int, FrozenSet[int]]:
    """Reads valid_answer.json.

    Returns:
      query_id -> frozenset of answer product ids.
    Raises:
      PrepError: naming the file (and query) for unreadable JSON or ids that are not
        integers.
    """
    def as_id(value) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        raise ValueError(f"{value!r} is not a non-negative integer id")

    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PrepError(f"{path}: cannot read the answers file: {e}") from None
    if not isinstance(obj, dict) or not obj:
        raise PrepError(f"{path}: expected a non-empty JSON object "
                        f'{{"query_id": [product_id, ...]}}, got {type(obj).__name__}')
    answers = {}
    for key, ids in obj.items():
        try:
            qid = as_id(key)
            if not isinstance(ids, list):
                raise ValueError(f"expected a list of product ids, got {type(ids).__name__}")
            answers[qid] = frozenset(as_id(x) for x in ids)
        except ValueError as e:
            raise PrepError(f"{path}: query {key!r}: {e}") from None
    return answers


def _canonical_answers(answers: Dict[int, FrozenSet[int]]) -> bytes:
    return json.dumps({str(q): sorted(p) for q, p in sorted(answers.items())}).encode("utf-8")


def _read_answers_state(out_dir: str) -> Dict[int, FrozenSet[int]]:
    with open(os.path.join(out_dir, ANSWERS_STATE), encoding="utf-8") as f:
        return {int(q): frozenset(p) for q, p in json.load(f).items()}


# ---------------------------------------------------------------------------------------
# Running the shards.
class _Runner:
    """Runs chunk tasks in the main process (1 worker) or a spawn pool, results in order."""

    def __init__(self, config: worker.ShardConfig, workers: int):
        self.config, self.workers, self.pool = config, workers, None
        if workers == 1:
            worker.warm_up()
            return
        # spawn, not fork: the parent may already hold TensorFlow's threads and locks.
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(workers + 1)
        self.pool = ctx.Pool(workers, initializer=worker.init_worker,
                             initargs=(config, barrier))
        try:  # until every worker has loaded the lemmatizer (workers never load TensorFlow)
            barrier.wait(timeout=_WORKER_START_TIMEOUT_S)
        except threading.BrokenBarrierError:
            self.pool.terminate()
            raise PrepError(f"{workers} worker processes did not start within "
                            f"{_WORKER_START_TIMEOUT_S} s") from None

    def run(self, tasks, on_result) -> None:
        """Calls on_result(sidecar) for each task, in task order."""
        if self.pool is None:
            for task in tasks:
                on_result(worker.process_chunk_timed(task, self.config))
            return
        pending = collections.deque()
        for task in tasks:
            pending.append(self.pool.apply_async(worker.process_chunk_in_worker, (task,)))
            if len(pending) >= 2 * self.workers:
                on_result(pending.popleft().get())
        while pending:
            on_result(pending.popleft().get())

    def close(self) -> None:
        if self.pool is not None:
            # Every task has returned (or failed) by now: nothing is lost by terminating,
            # which is quicker than a clean exit.
            self.pool.terminate()
            self.pool.join()


def _run_split(runner: _Runner, options: PrepOptions, split: str, source: str) -> dict:
    """Writes this machine's shards of one split.

    Returns:
      {"num_chunks", counters "written", "skipped", "rewritten", "rows", "rejected",
       "cpu_s", and "rewritten_why": [what was wrong with each rewritten shard]}.
    """
    def owns(index: int) -> bool:
        return index % options.num_shards == options.shard_index

    shards.remove_stale_temporaries(options.out, split, owns)
    os.makedirs(os.path.join(options.out, split), exist_ok=True)
    counts = collections.Counter()
    rewritten: List[str] = []  # why each finished shard that failed its check was replaced
    num_chunks = 0
    bar = tqdm(desc=f"prep {split}", unit=" rows", disable=not options.progress, file=sys.stderr)

    def tasks():
        nonlocal num_chunks
        for chunk in tsv.iter_chunks(source, options.rows_per_shard,
                                     group_by_query=split != "train"):
            num_chunks = chunk.index + 1
            if owns(chunk.index):
                yield worker.ChunkTask(split, source, chunk)

    def on_result(sidecar: dict) -> None:
        counts["skipped" if sidecar["skipped"] else "written"] += 1
        if sidecar.get("rewritten"):
            counts["rewritten"] += 1
            rewritten.append(sidecar["rewritten"])
        counts["rows"] += sidecar["rows"]
        counts["rejected"] += sidecar["rejected"]
        counts["cpu_s"] += sidecar["cpu_s"]
        bar.update(sidecar["rows"] + sidecar["rejected"])
        bar.set_postfix(rejected=counts["rejected"], refresh=False)

    try:
        runner.run(tasks(), on_result)
    finally:
        bar.close()
    return {"num_chunks": num_chunks, **counts, "rewritten_why": rewritten}


# ---------------------------------------------------------------------------------------
# Finalizing: sidecars -> rejects files, vocabulary, word2vec, manifest.
def _load_split_sidecars(out_dir: str, split: str, num_chunks: int) -> List[dict]:
    sidecars = []
    for k in range(num_chunks):
        sidecar = shards.load_sidecar(out_dir, split, k)
        if not shards.is_complete(out_dir, sidecar):
            raise PrepError(f"{out_dir}: shard {k} of {split} is missing or incomplete; "
                            f"rerun prep (or prep-merge with every machine's output)")
        sidecars.append(sidecar)
    return sidecars


def _concat_rejects(out_dir: str, split: str, sidecars: List[dict]) -> str:
    rel = f"{REJECTS_DIR}/{split}.tsv"
    os.makedirs(os.path.join(out_dir, REJECTS_DIR), exist_ok=True)
    path = os.path.join(out_dir, rel)
    tmp = shards.tmp_name(path)
    with open(tmp, "wb") as out:
        out.write(shards.REJECTS_HEADER)
        for s in sidecars:
            with open(os.path.join(out_dir, s["sidecars"][0]), "rb") as f:
                while block := f.read(1 << 20):
                    out.write(block)
    os.replace(tmp, path)
    return rel


def _split_entry(out_dir: str, split: str, source: str, sidecars: List[dict]) -> dict:
    reasons = collections.Counter()
    for s in sidecars:
        reasons.update(s["reject_reasons"])
    entry = {
        "source": source,
        "shards": [{"file": s["file"], "rows": s["rows"], "bytes": s["bytes"],
                    "crc32c": s["crc32c"]} for s in sidecars],
        "rows": sum(s["rows"] for s in sidecars),
        "rejected": sum(s["rejected"] for s in sidecars),
        "reject_reasons": dict(sorted(reasons.items())),
        "capped": sum(s["capped"] for s in sidecars),
        "rejects_file": _concat_rejects(out_dir, split, sidecars),
    }
    if split != "train":
        # A query never spans two shards, so per-shard query and duplicate counts add up.
        entry["queries"] = sum(len(s["queries"]) for s in sidecars)
        entry["duplicates"] = sum(s["duplicates"] for s in sidecars)
    if split == "valid":
        entry.update(_answer_coverage(out_dir, sidecars))
    return entry


def _answer_coverage(out_dir: str, sidecars: List[dict]) -> dict:
    answers = _read_answers_state(out_dir)
    found = {(q, p) for s in sidecars for q, p in s["positives"]}
    queries = {q for s in sidecars for q in s["queries"]}
    missing = sorted((q, p) for q, ps in answers.items() for p in ps if (q, p) not in found)
    absent = sorted(q for q in answers if q not in queries)
    missing_file = f"{REJECTS_DIR}/valid_missing_answers.tsv"
    shards.write_atomic(os.path.join(out_dir, missing_file), (
        "query_id\tproduct_id\n" + "".join(f"{q}\t{p}\n" for q, p in missing)).encode("utf-8"))
    if missing:
        shown = ", ".join(f"{q}:{p}" for q, p in missing[:EXAMPLES_SHOWN])
        print(f"warning: {len(missing)} answers (query:product) of the answers file are not "
              f"among the kept valid rows, e.g. {shown}; {len(absent)} answered queries have "
              f"no kept row at all", file=sys.stderr)
    return {
        "positives": len(found),
        "answers": sum(len(ps) for ps in answers.values()),
        "answers_missing": len(missing),
        "answers_missing_file": missing_file,
        "answered_queries_missing": len(absent),
        "queries_without_answers": len(queries - set(answers)),
    }


def finalize(options: PrepOptions, sources: Dict[str, str], num_chunks: Dict[str, int]) -> dict:
    """Builds the reject files, vocabulary, word2vec and manifest from the shards' sidecars.

    Args:
      options: the prep options (settings() must match those the shards were made with).
      sources: split -> TSV path, for the manifest.
      num_chunks: split -> number of shards, all of which must be complete in options.out.
    Returns:
      The manifest, also written (last, atomically) to DIR/manifest.json.
    """
    out = options.out
    # Temporaries of a finalize that was killed or failed (e.g. disk full): only one
    # process finalizes a directory, so every one of them is stale.
    shards.remove_temporaries(out, [schema.VOCAB_FILE, schema.EMBEDDINGS_FILE,
                                    word2vec.MODEL_FILE, schema.MANIFEST_FILE])
    shards.remove_temporaries(os.path.join(out, REJECTS_DIR))
    manifest = {
        "schema_version": schema.SCHEMA_VERSION,
        "normalization_version": text.NORMALIZATION_VERSION,
        "compression": "GZIP" if options.gzip else "",
        "max_boxes": options.max_boxes,
        "drop_leading_be": not options.keep_leading_be,
        "rows_per_shard": options.rows_per_shard,
        "min_count": options.min_count,
        "vocab": None, "embeddings": None, "word2vec_model": None,
        "embedding_dim": options.embedding_dim, "vocab_size": 0, "w2v_epochs": options.w2v_epochs,
        "w2v_missing": 0,
        "splits": {},
    }
    all_sidecars = {}
    for split in schema.SPLITS:
        if split in num_chunks:
            all_sidecars[split] = _load_split_sidecars(out, split, num_chunks[split])
            manifest["splits"][split] = _split_entry(out, split, sources[split],
                                                     all_sidecars[split])
    if "train" in all_sidecars:
        counts = collections.Counter()
        for s in all_sidecars["train"]:
            counts.update(s["lemma_counts"])
        entries = vocab.build_vocab(counts, options.min_count)
        vocab.save_vocab(entries, os.path.join(out, schema.VOCAB_FILE))
        corpus = [os.path.join(out, s["sidecars"][1]) for s in all_sidecars["train"]]
        model = word2vec.train(corpus, options.embedding_dim, options.min_count,
                               options.w2v_epochs)
        matrix, missing = word2vec.aligned_vectors(model, [t for t, _ in entries],
                                                   options.embedding_dim)
        if missing:
            print(f"warning: word2vec has no vector for {len(missing)} vocabulary lemmas "
                  f"(e.g. {missing[:EXAMPLES_SHOWN]}); they get random unit vectors",
                  file=sys.stderr)
        word2vec.save(out, model, matrix, schema.EMBEDDINGS_FILE)
        manifest.update(vocab=schema.VOCAB_FILE, embeddings=schema.EMBEDDINGS_FILE,
                        word2vec_model=word2vec.MODEL_FILE if model is not None else None,
                        vocab_size=len(entries), w2v_missing=len(missing))
    else:
        print("warning: no --train split: no vocab.tsv / word2vec.npy written",
              file=sys.stderr)
    shards.write_json_atomic(os.path.join(out, schema.MANIFEST_FILE), manifest)
    return manifest


def partial_manifest_name(shard_index: int, num_shards: int) -> str:
    """File name of machine shard_index's partial manifest (in its output directory)."""
    return PARTIAL_MANIFEST.format(index=shard_index, count=num_shards)


def run(options: PrepOptions) -> dict:
    """Runs prep.

    Returns:
      {"manifest": the manifest (None for a partial run), "splits": per-split counters,
       "seconds": wall "startup" (workers warm), "shards" (until the last shard is done),
       "finalize" (stopping workers, vocabulary, word2vec, manifest); CPU "shards_main_cpu"
       (main process while shards were written) and "shards_chunk_cpu" (all workers,
       chunks only)}.

    Raises:
      PrepError, tsv.TsvFormatError: bad options or inputs (messages name the file).
    """
    options.validate()
    for _, path in options.inputs():  # fail on a bad header before any work
        with open(path, "rb") as f:
            tsv.check_header(path, f.readline() or None)
    answers, answers_sha, canonical = {}, "", b""
    if options.valid:  # read before anything is created
        answers = load_answers(options.valid_answers)
        canonical = _canonical_answers(answers)
        answers_sha = hashlib.sha256(canonical).hexdigest()
    os.makedirs(os.path.join(options.out, shards.STATE_DIR), exist_ok=True)
    # A manifest says "this directory is complete": withdraw it while shards may change.
    manifest_name = (schema.MANIFEST_FILE if options.num_shards == 1
                     else partial_manifest_name(options.shard_index, options.num_shards))
    manifest_path = os.path.join(options.out, manifest_name)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)
    shards.remove_temporaries(options.out, [manifest_name])
    if options.num_shards == 1:  # machines sharing DIR all write the answers state
        shards.remove_temporaries(os.path.join(options.out, shards.STATE_DIR),
                                  [os.path.basename(ANSWERS_STATE)])
    if options.valid:
        shards.write_atomic(os.path.join(options.out, ANSWERS_STATE), canonical)
    config = worker.ShardConfig(out_dir=options.out, max_boxes=options.max_boxes,
                               drop_leading_be=not options.keep_leading_be, gzip=options.gzip,
                               answers=answers, answers_sha256=answers_sha)
    t0 = time.perf_counter()
    runner = _Runner(config, options.workers)
    t1, cpu1 = time.perf_counter(), time.process_time()
    try:
        stats = {split: _run_split(runner, options, split, os.path.abspath(path))
                 for split, path in options.inputs()}
        t2, cpu2 = time.perf_counter(), time.process_time()  # the last shard is done
    finally:
        runner.close()
    sources = {split: os.path.abspath(path) for split, path in options.inputs()}
    chunks = {split: s["num_chunks"] for split, s in stats.items()}
    if options.num_shards > 1:
        manifest = None
        shards.write_json_atomic(
            os.path.join(options.out, partial_manifest_name(options.shard_index,
                                                            options.num_shards)),
            {"schema_version": schema.SCHEMA_VERSION, "settings": options.settings(),
             "shard_index": options.shard_index, "num_shards": options.num_shards,
             "sources": sources, "num_chunks": chunks})
    else:
        manifest = finalize(options, sources, chunks)
    t3 = time.perf_counter()
    return {"manifest": manifest, "splits": stats,
            "seconds": {"startup": t1 - t0, "shards": t2 - t1, "finalize": t3 - t2,
                        "shards_main_cpu": cpu2 - cpu1,
                        "shards_chunk_cpu": sum(s.get("cpu_s", 0.0) for s in stats.values())}}
