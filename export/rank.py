"""`mmrecall rank`: ranks each query's candidates with a SavedModel into the submission CSV.

    mmrecall rank --model EXPORT_DIR --input valid.tsv --out submission.csv
                  [--scores scores.tsv] [--batch-queries N]

The TSV is streamed in query groups (rows of a query are contiguous in valid/test files);
`--batch-queries` groups at a time are sent to the SavedModel's `serving_default` signature
as raw TSV fields (query text, base64 boxes/features/class_labels, ints), so the scoring path
is only TensorFlow, tensorflow-text's ops and the exported graph, exactly what TF Serving
runs; the model is loaded the way the model server loads it (TF1 loader into a Session). Candidates are ordered by score (ties: file order), repeated product ids count once.

Queries with fewer than 5 distinct candidates: the organiser rejects a line without 5
distinct ids, so such a line is completed with product ids of other queries' candidates
(in order of first appearance in the file). Answers almost never appear in two lists, so
this costs nothing; it is reported on stderr.

Both output files are written to a temporary file and renamed, so a failed run leaves no
partial submission behind.
"""
import argparse
import os
import re
import sys
import tempfile
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

K = 5
SUBMISSION_HEADER = "query-id,product1,product2,product3,product4,product5"
TSV_COLUMNS = ("product_id", "image_h", "image_w", "num_boxes", "boxes", "features",
               "class_labels", "query", "query_id")
_COL = {name: i for i, name in enumerate(TSV_COLUMNS)}
# Request fields of the serving_default signature (the TSV columns the model reads).
STRING_FIELDS = ("boxes", "features", "class_labels", "query")
INT_FIELDS = ("num_boxes", "image_h", "image_w")


class RankError(RuntimeError):
    """A problem with the input file or a request the model rejected."""


class QueryGroup(NamedTuple):
    query_id: int
    first_line: int
    product_ids: List[int]
    fields: Dict[str, List]   # request field -> one value per candidate
    lines: List[int]          # the file line of each candidate


def resolve_model_dir(path: str) -> str:
    """A SavedModel directory: `path` itself, or its newest numeric version (as TF Serving)."""
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    versions = [d for d in os.listdir(path) if d.isdigit() and
                os.path.exists(os.path.join(path, d, "saved_model.pb"))]
    if not versions:
        raise FileNotFoundError(f"{path}: no saved_model.pb and no numeric version directory")
    return os.path.join(path, max(versions, key=int))


def iter_query_groups(path: str) -> Iterator[QueryGroup]:
    """Streams the candidates of one query at a time from a competition TSV.

    Raises:
      RankError: bad header or column count, non-integer ids, or a query's rows not contiguous.
    """
    seen = set()
    group: Optional[QueryGroup] = None
    with open(path, "rb") as f:
        # Read as bytes and decode line by line, so an encoding error names its line.
        for line_no, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise RankError(f"{path}:{line_no}: not UTF-8 ({e.reason} at byte "
                                f"{e.start})") from None
            if line_no == 1:
                if line.split("\t") != list(TSV_COLUMNS):
                    raise RankError(f"{path}:1: header {line[:120]!r}, expected "
                                    f"{chr(9).join(TSV_COLUMNS)!r}")
                continue
            if not line:
                continue
            values = line.split("\t")
            if len(values) != len(TSV_COLUMNS):
                raise RankError(f"{path}:{line_no}: {len(values)} columns, expected "
                                f"{len(TSV_COLUMNS)}")
            try:
                qid = int(values[_COL["query_id"]])
                pid = int(values[_COL["product_id"]])
                ints = {k: int(values[_COL[k]]) for k in INT_FIELDS}
            except ValueError:
                raise RankError(f"{path}:{line_no}: product_id, query_id, num_boxes, image_h "
                                f"and image_w must be integers") from None
            if group is None or qid != group.query_id:
                if group is not None:
                    yield group
                if qid in seen:
                    raise RankError(f"{path}:{line_no}: rows of query {qid} are not contiguous "
                                    f"(the query appeared before line {line_no})")
                seen.add(qid)
                group = QueryGroup(qid, line_no, [], {k: [] for k in STRING_FIELDS + INT_FIELDS},
                                   [])
            group.product_ids.append(pid)
            group.lines.append(line_no)
            for k in STRING_FIELDS:
                group.fields[k].append(values[_COL[k]])
            for k, v in ints.items():
                group.fields[k].append(v)
    if group is not None:
        yield group


class SavedModelScorer:
    """Scores (query, product) rows with a SavedModel's serving_default signature.

    By default the SavedModel is loaded the way the TF Serving model server loads it: the
    TF1 loader (`tf.compat.v1.saved_model.load`) into a Session of its own graph, then
    `Session.run` of the signature's tensors. This takes about a second, where
    `tf.saved_model.load` prunes a function per signature out of the graph (6-16 s for our
    graph) and adds Python-side overhead to every call (TF 2.15 formats every input
    tensor's repr when binding a TF1 signature's keyword arguments: ~16 ms for 30 rows).
    Either way the scoring path is TensorFlow, tensorflow-text's ops and the exported graph.
    """

    def __init__(self, model_dir: str, signature: str = "serving_default", loaded=None):
        """Args:
          model_dir: a SavedModel directory or its export base (newest version).
          signature: the pair-scoring signature.
          loaded: an already loaded SavedModel (`tf.saved_model.load`; then model_dir is only
            informative and its signature function is called).
        """
        import tensorflow as tf
        import tensorflow_text  # noqa: F401  registers NormalizeUTF8 used by the graph

        self._tf = tf
        self._session = None
        if loaded is None:
            self.path = resolve_model_dir(model_dir)
            graph = tf.Graph()
            with graph.as_default():
                self._session = tf.compat.v1.Session(graph=graph)
                meta = tf.compat.v1.saved_model.load(
                    self._session, [tf.saved_model.SERVING], self.path)
            if signature not in meta.signature_def:
                raise KeyError(f"{self.path}: no signature {signature!r} "
                               f"(has {sorted(meta.signature_def)})")
            sig = meta.signature_def[signature]
            self._feeds = {k: graph.get_tensor_by_name(v.name) for k, v in sig.inputs.items()}
            self._fetch = graph.get_tensor_by_name(sig.outputs["score"].name)
            self._fn = None
        else:
            self.path = model_dir
            self._fn = loaded.signatures[signature]
        self._model = loaded

    def score(self, fields: Dict[str, Sequence]) -> np.ndarray:
        if self._session is not None:
            feed = {self._feeds[k]: np.array(list(fields[k]), dtype=object)
                    for k in STRING_FIELDS}
            feed.update({self._feeds[k]: np.array(list(fields[k]), np.int64)
                         for k in INT_FIELDS})
            return self._session.run(self._fetch, feed)
        tf = self._tf
        inputs = {k: tf.constant(list(fields[k]), tf.string) for k in STRING_FIELDS}
        inputs.update({k: tf.constant(list(fields[k]), tf.int64) for k in INT_FIELDS})
        return self._fn(**inputs)["score"].numpy()

    def close(self) -> None:
        if self._session is not None:
            self._session.close()
            self._session = None


def top_k(product_ids: Sequence[int], scores: Sequence[float], k: int = K) -> List[int]:
    """The k best distinct ids by score, ties in input order."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    ranked: List[int] = []
    for i in order:
        pid = int(product_ids[i])
        if pid not in ranked:
            ranked.append(pid)
        if len(ranked) == k:
            break
    return ranked


def _score_groups(scorer: SavedModelScorer, groups: List[QueryGroup], input_path: str
                  ) -> List[np.ndarray]:
    """Scores a batch of query groups in one call; on a rejected request, names the row."""
    import tensorflow as tf

    fields = {k: [v for g in groups for v in g.fields[k]] for k in STRING_FIELDS + INT_FIELDS}
    try:
        scores = scorer.score(fields)
    except tf.errors.InvalidArgumentError as e:
        raise RankError(_locate_rejection(scorer, groups, input_path, e)) from None
    out, start = [], 0
    for g in groups:
        out.append(scores[start:start + len(g.product_ids)])
        start += len(g.product_ids)
    return out


def _locate_rejection(scorer, groups, input_path, error) -> str:
    """Re-scores row by row to name the first rejected line (only after a failure)."""
    import tensorflow as tf

    for g in groups:
        for i, pid in enumerate(g.product_ids):
            try:
                scorer.score({k: g.fields[k][i:i + 1] for k in STRING_FIELDS + INT_FIELDS})
            except tf.errors.InvalidArgumentError as e:
                return (f"{input_path}:{g.lines[i]}: query {g.query_id}, product {pid} "
                        f"rejected by the model: {field_message(e.message)}")
    return f"{input_path}: a batch was rejected by the model: {field_message(error.message)}"


_FIELD_MESSAGE = re.compile(r"\[((?:%s): [^\]]*)\]" % "|".join(STRING_FIELDS + INT_FIELDS))


def field_message(message: str) -> str:
    """The field-naming text of an InvalidArgument raised by a tf.debugging assertion."""
    found = _FIELD_MESSAGE.search(message)
    if found:
        return found.group(1)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else message


def _write_atomic(path: str, lines: Iterator[str]) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            for line in lines:
                f.write(line + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def rank_file(model_dir: str, input_path: str, out_path: str,
              scores_path: Optional[str] = None, batch_queries: int = 8,
              scorer: Optional[SavedModelScorer] = None) -> Dict[str, int]:
    """Ranks every query of a TSV and writes the submission (and optionally all scores).

    Returns:
      {"queries": ..., "candidates": ..., "padded_queries": ...}.
    """
    if batch_queries < 1:
        raise ValueError("batch_queries must be >= 1")
    owned = scorer is None
    scorer = scorer or SavedModelScorer(model_dir)
    ranked: List[Tuple[int, List[int]]] = []
    pool: Dict[int, None] = {}          # every product id, in order of first appearance
    score_lines: List[str] = ["query_id\tproduct_id\tscore"] if scores_path else []
    candidates = 0

    def flush(batch):
        nonlocal candidates
        for g, s in zip(batch, _score_groups(scorer, batch, input_path)):
            ranked.append((g.query_id, top_k(g.product_ids, s)))
            candidates += len(g.product_ids)
            if scores_path:
                score_lines.extend(f"{g.query_id}\t{p}\t{float(v):.9g}"
                                   for p, v in zip(g.product_ids, s))

    batch: List[QueryGroup] = []
    for group in iter_query_groups(input_path):
        pool.update(dict.fromkeys(group.product_ids))
        batch.append(group)
        if len(batch) == batch_queries:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if owned:
        scorer.close()
    if not ranked:
        raise RankError(f"{input_path}: no data rows")

    padded = []
    for qid, ids in ranked:
        if len(ids) < K:
            fill = [p for p in pool if p not in ids][:K - len(ids)]
            if len(ids) + len(fill) < K:
                raise RankError(f"{input_path}: only {len(pool)} distinct product ids in the "
                                f"file, cannot list {K} per query")
            ids.extend(fill)
            padded.append(qid)
    if padded:
        print(f"mmrecall rank: {len(padded)} queries had fewer than {K} candidates and were "
              f"completed with other queries' products: {padded[:10]}", file=sys.stderr)

    _write_atomic(out_path, [SUBMISSION_HEADER] +
                  [",".join(map(str, [qid] + ids)) for qid, ids in ranked])
    if scores_path:
        _write_atomic(scores_path, score_lines)
    return {"queries": len(ranked), "candidates": candidates, "padded_queries": len(padded)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="mmrecall rank",
        description="rank candidate lists with a SavedModel into the submission CSV")
    parser.add_argument("--model", required=True,
                        help="SavedModel directory or its export base (newest version used)")
    parser.add_argument("--input", required=True, help="competition TSV (valid/test)")
    parser.add_argument("--out", required=True, help="submission CSV to write")
    parser.add_argument("--scores", default=None,
                        help="also write query_id<TAB>product_id<TAB>score for every row")
    parser.add_argument("--batch-queries", type=int, default=8,
                        help="query groups per SavedModel call (default 8)")
    args = parser.parse_args(argv)
    try:
        stats = rank_file(args.model, args.input, args.out, args.scores, args.batch_queries)
    except RankError as e:
        print(f"mmrecall rank: {e}", file=sys.stderr)
        return 1
    print(f"mmrecall rank: {stats['queries']} queries, {stats['candidates']} candidates "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
