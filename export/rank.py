"""`mmrecall rank`: ranks each query's candidates with a SavedModel into the submission CSV.

    mmrecall rank --model EXPORT_DIR --input valid.tsv --out submission.csv
                  [--scores scores.tsv] [--batch-queries N] [--first-stage]
                  [--on-bad-row skip|fail] [--rejects PATH]

The TSV is streamed in query groups (rows of a query are contiguous in valid/test files);
`--batch-queries` groups at a time are sent to the SavedModel's `rank` signature as whole
lists of raw TSV fields (query text, base64 boxes/features/class_labels, ints), padded to
the batch's longest list with num_boxes = 0 rows, which the signature leaves out. So the
ranking is the served one, list stage included (`--first-stage`: rank by the signature's
first-stage scores instead), and the scoring path is only TensorFlow, tensorflow-text's ops
and the exported graph, exactly what TF Serving runs; the model is loaded the way the model
server loads it (TF1 loader into a Session). Candidates are ordered by score (ties: file
order), repeated product ids count once.

Bad rows. Every row is validated as it is read, by prep's validator (data_prep.tsv: the
header, a BOM before it included, column count, ids, base64 lengths, finite features,
labels, boxes inside the image, UTF-8 query; a query_id reappearing after other queries),
and a row the model still refuses (e.g. a query with no word left after normalisation) is
found row by row after its batch fails. With `--on-bad-row skip` (the default) such rows
are left out and listed in the rejects file (default: next to --out, OUT_STEM.rejects.tsv;
line, query_id, product_id, field, reason, detail; written on every run, so it never shows
an earlier run's rows), a summary goes to stderr and the exit status stays 0; with `fail`
the first bad row ends the run (exit 1) naming its line, field and reason, and nothing is
written.

Every query of the file gets a submission line, because the organiser refuses a submission
that lacks an answered query: a query whose candidates were all (or partly) rejected lists
its scored candidates first, then its rejected candidates whose product_id is readable, in
file order (they are still its real candidates, unscored), then, as for any list shorter
than 5, product ids of other queries' candidates (in order of first appearance in the
file). Answers almost never appear in two lists, so that filling costs nothing; both are
reported on stderr. A row whose query_id is unreadable belongs to no query and is only
reported.

All output files are written to a temporary file and renamed, so a failed run leaves no
partial submission behind.
"""
import argparse
import os
import re
import sys
import tempfile
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from data_prep import schema
from data_prep import tsv
from data_prep.os_errors import os_error_line
from estimator import outputs
from export import product_graph as pg
from export import signatures as sig_lib

_COL = {name: i for i, name in enumerate(schema.TSV_COLUMNS)}
# Request fields of the serving_default and rank signatures (the TSV columns the model reads).
STRING_FIELDS = sig_lib.PRODUCT_B64_FIELDS + (sig_lib.QUERY,)
INT_FIELDS = sig_lib.PRODUCT_INT_FIELDS


BAD_ROW_POLICIES = ("skip", "fail")
REJECTS_HEADER = ("line", "query_id", "product_id", "field", "reason", "detail")
# Reason of a row that passed the validator but that the model refused.
MODEL_REASON = "model"


class RankError(RuntimeError):
    """A problem with the input file or a request the model rejected."""


class Reject(NamedTuple):
    """A row left out: its file line, ids (None when unreadable), field, reason and detail."""
    line: int
    query_id: Optional[int]
    product_id: Optional[int]
    field: str
    reason: str
    detail: str


class QueryGroup(NamedTuple):
    """The C candidate rows of one query, in file order."""
    query_id: int
    first_line: int
    product_ids: List[int]
    fields: Dict[str, List]   # request field -> one value per candidate
    lines: List[int]          # the file line of each candidate
    rejected: List[Reject]    # this query's rows left out


def resolve_model_dir(path: str) -> str:
    """A SavedModel directory: `path` itself, or its newest numeric version (as TF Serving)."""
    if os.path.exists(os.path.join(path, "saved_model.pb")):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such SavedModel directory; give the --export-dir "
                                f"of mmrecall export or one of its version directories")
    versions = [d for d in os.listdir(path) if d.isdigit() and
                os.path.exists(os.path.join(path, d, "saved_model.pb"))]
    if not versions:
        raise FileNotFoundError(f"{path}: no saved_model.pb and no numeric version directory")
    return os.path.join(path, max(versions, key=int))


def _readable_id(values: List[bytes], column: str) -> Optional[int]:
    """The id in `column` of a split row when it is a non-negative integer, else None."""
    if len(values) != len(schema.TSV_COLUMNS):
        return None
    raw = values[_COL[column]]
    return int(raw) if raw.isdigit() else None


def _row_text(path: str, reject: Reject) -> str:
    return f"{path}:{reject.line}: {reject.field}: {reject.detail} ({reject.reason})"


def iter_query_groups(path: str, rejects: Optional[List[Reject]] = None
                      ) -> Iterator[QueryGroup]:
    """Streams the candidates of one query at a time from a competition TSV.

    Each row is checked by data_prep.tsv.parse_row, and a row whose query_id reappears after
    other queries is refused too (as prep does for valid/test files).

    Args:
      path: the TSV (a UTF-8 BOM before the header is accepted).
      rejects: where bad rows are appended (skipped); None: the first bad row raises.
        A bad row with a readable query_id is also kept in its group's `rejected`, so a
        query whose rows are all bad is still yielded (with no candidate).
    Raises:
      RankError: a bad header or empty file; with rejects None, the first bad row.
    """
    seen = set()
    group: Optional[QueryGroup] = None
    with open(path, "rb") as f:
        try:
            tsv.check_header(path, f.readline() or None)
        except tsv.TsvFormatError as e:
            raise RankError(str(e)) from None
        for line_no, raw in enumerate(f, start=2):
            raw = raw.rstrip(b"\r\n")
            if not raw:
                continue
            values = raw.split(b"\t")
            qid = _readable_id(values, "query_id")
            reject = None
            try:
                row = tsv.parse_row(raw)
            except tsv.RowError as e:
                reject = Reject(line_no, qid, _readable_id(values, "product_id"), e.field,
                                e.reason, e.detail)
            if reject is None and qid in seen and qid != group.query_id:
                reject = Reject(line_no, qid, row.product_id, "query_id", "query_not_grouped",
                                f"query_id {qid} reappears after other queries")
            if reject is not None:
                if rejects is None:
                    raise RankError(_row_text(path, reject))
                rejects.append(reject)
                if qid is None or (qid in seen and qid != group.query_id):
                    continue           # no group to attach it to (or not its own run)
            if group is None or qid != group.query_id:
                if group is not None:
                    yield group
                seen.add(qid)
                group = QueryGroup(qid, line_no, [], {k: [] for k in STRING_FIELDS + INT_FIELDS},
                                   [], [])
            if reject is not None:
                group.rejected.append(reject)
                continue
            group.product_ids.append(row.product_id)
            group.lines.append(line_no)
            for k in sig_lib.PRODUCT_B64_FIELDS:   # sent as the TSV's text
                group.fields[k].append(values[_COL[k]].decode("ascii"))
            group.fields[sig_lib.QUERY].append(row.query)
            group.fields[pg.NUM_BOXES_FIELD].append(len(row.labels))
            group.fields[pg.IMAGE_H_FIELD].append(row.image_h)
            group.fields[pg.IMAGE_W_FIELD].append(row.image_w)
    if group is not None:
        yield group


class SessionExport(NamedTuple):
    """A SavedModel loaded as the TF Serving model server loads it: the TF1 loader into a
    Session of its own graph. `tensors[(signature, output)]` = (input tensors by key, the
    output tensor), for `Session.run`."""
    path: str
    session: object
    tensors: Dict[Tuple[str, str], Tuple[Dict[str, object], object]]


def load_session_export(model_dir: str, wanted: Sequence[Tuple[str, str]]) -> SessionExport:
    """Loads a SavedModel into a Session and looks up the (signature, output) pairs `wanted`.

    Args:
      model_dir: a SavedModel directory or its export base (newest version used).
      wanted: (signature name, output key) pairs the caller will run.
    Raises:
      FileNotFoundError: no SavedModel there.
      KeyError: a signature or output is missing (message names the export and what it has).
    """
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  registers NormalizeUTF8 used by the graph

    path = resolve_model_dir(model_dir)
    graph = tf.Graph()
    with graph.as_default():
        session = tf.compat.v1.Session(graph=graph)
        meta = tf.compat.v1.saved_model.load(session, [tf.saved_model.SERVING], path)
    tensors = {}
    for name, output in wanted:
        sig = meta.signature_def.get(name)
        if sig is None or output not in sig.outputs:
            session.close()
            raise KeyError(f"{path}: no signature {name!r} with output {output!r} "
                           f"(has {sorted(meta.signature_def)}); export it again with "
                           f"this version of mmrecall")
        tensors[(name, output)] = (
            {k: graph.get_tensor_by_name(v.name) for k, v in sig.inputs.items()},
            graph.get_tensor_by_name(sig.outputs[output].name))
    return SessionExport(path, session, tensors)


class SavedModelScorer:
    """Scores candidate lists with a SavedModel's `rank` signature (and pairs with its
    serving_default).

    By default the SavedModel is loaded the way the TF Serving model server loads it: the
    TF1 loader (`tf.compat.v1.saved_model.load`) into a Session of its own graph, then
    `Session.run` of the signature's tensors. This loads in about a second, where
    `tf.saved_model.load` prunes a function per signature out of the graph (several seconds
    for this graph) and adds Python-side overhead to every call (TF 2.15 formats every input
    tensor's repr when binding a TF1 signature's keyword arguments).
    Either way the scoring path is TensorFlow, tensorflow-text's ops and the exported graph.
    """

    def __init__(self, model_dir: str, loaded=None, first_stage: bool = False):
        """Args:
          model_dir: a SavedModel directory or its export base (newest version).
          loaded: an already loaded SavedModel (`tf.saved_model.load`; then model_dir is only
            informative and its signature functions are called).
          first_stage: score lists by `rank`'s first_stage_scores instead of its scores.
        """
        import tensorflow as tf

        self._tf = tf
        self._session = None
        self._list_output = sig_lib.FIRST_STAGE_SCORES if first_stage else sig_lib.SCORES
        self._model = loaded
        if loaded is not None:
            self.path = model_dir
            return
        export = load_session_export(model_dir, [(sig_lib.SERVING_DEFAULT, outputs.SCORE),
                                                 (sig_lib.RANK, self._list_output)])
        self.path, self._session = export.path, export.session
        self._tensors = {name: tensors for (name, _), tensors in export.tensors.items()}

    def _run(self, signature: str, output: str, inputs: Dict[str, np.ndarray]) -> np.ndarray:
        if self._session is not None:
            feeds, fetch = self._tensors[signature]
            return self._session.run(fetch, {feeds[k]: v for k, v in inputs.items()})
        tf = self._tf
        fn = self._model.signatures[signature]
        return fn(**{k: tf.constant(v) for k, v in inputs.items()})[output].numpy()

    def score(self, fields: Dict[str, Sequence]) -> np.ndarray:
        """Pairs {STRING_FIELDS, INT_FIELDS: [P] values} -> float32 [P] first-stage scores
        (serving_default)."""
        inputs = {k: np.array(list(fields[k]), dtype=object) for k in STRING_FIELDS}
        inputs.update({k: np.array(list(fields[k]), np.int64) for k in INT_FIELDS})
        return self._run(sig_lib.SERVING_DEFAULT, outputs.SCORE, inputs)

    def score_lists(self, lists: Sequence[Dict[str, Sequence]]) -> List[np.ndarray]:
        """Whole candidate lists -> each list's float32 [C_i] scores (`rank`).

        Args:
          lists: per list {STRING_FIELDS, INT_FIELDS: [C_i] values}, one query text
            repeated (its first value is sent).
        """
        inputs = pad_lists(lists)
        scores = self._run(sig_lib.RANK, self._list_output, inputs)              # [Q, C]
        return [scores[i, :len(l[sig_lib.QUERY])] for i, l in enumerate(lists)]

    def close(self) -> None:
        """Closes the Session (if this scorer opened one)."""
        if self._session is not None:
            self._session.close()
            self._session = None


def pad_lists(lists: Sequence[Dict[str, Sequence]]) -> Dict[str, np.ndarray]:
    """`rank` inputs for whole lists: query [Q], product fields [Q, C] padded to the longest
    list with padding candidates (empty strings, num_boxes 0: left out by the signature).

    Args:
      lists: per list {STRING_FIELDS, INT_FIELDS: [C_i] values} with C_i >= 1.
    Returns:
      {field: object [Q, C] or int64 [Q, C] numpy}, {"query": object [Q]}.
    """
    width = max(len(l[sig_lib.QUERY]) for l in lists)
    inputs = {k: np.full([len(lists), width], b"", dtype=object)
              for k in sig_lib.PRODUCT_B64_FIELDS}
    inputs.update({k: np.zeros([len(lists), width], np.int64) for k in INT_FIELDS})
    for i, fields in enumerate(lists):
        for k in inputs:
            inputs[k][i, :len(fields[k])] = fields[k]
    inputs[sig_lib.QUERY] = np.array([l[sig_lib.QUERY][0] for l in lists], dtype=object)
    return inputs


def top_k(product_ids: Sequence[int], scores: Sequence[float],
          k: int = schema.NDCG_K) -> List[int]:
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


def _score_groups(scorer: SavedModelScorer, groups: List[QueryGroup], input_path: str,
                  skip: bool) -> List[QueryGroup]:
    """Scores a batch of query groups in one call; returns the groups as scored.

    When the model rejects the batch, its rows are scored one by one to find the rejected
    ones: with `skip` they move to their group's `rejected` (reason MODEL_REASON) and the
    rest is scored again; otherwise RankError names the first.

    Returns:
      (the groups without the rows the model rejected, their float32 [C_i] scores; C_i = 0
      for a group with no candidate left).
    """
    import tensorflow as tf

    scored = [g for g in groups if g.product_ids]
    try:
        lists = iter(scorer.score_lists([g.fields for g in scored]) if scored else [])
        return groups, [next(lists) if g.product_ids else np.zeros([0], np.float32)
                        for g in groups]
    except tf.errors.InvalidArgumentError as e:
        batch_error = e
    kept = []
    for g in groups:
        good = []
        for i, pid in enumerate(g.product_ids):
            try:
                scorer.score_lists([_take(g.fields, [i])])
                good.append(i)
            except tf.errors.InvalidArgumentError as e:
                message = field_message(e.message)
                if not skip:
                    raise RankError(f"{input_path}:{g.lines[i]}: query {g.query_id}, product "
                                    f"{pid} rejected by the model: {message}") from None
                field = message.split(":")[0]
                g.rejected.append(Reject(
                    g.lines[i], g.query_id, pid,
                    field if field in STRING_FIELDS + INT_FIELDS else "line", MODEL_REASON,
                    " ".join(message.split())))
        kept.append(g._replace(product_ids=[g.product_ids[i] for i in good],
                               lines=[g.lines[i] for i in good],
                               fields=_take(g.fields, good)))
    if not skip or all(len(k.product_ids) == len(g.product_ids) for k, g in zip(kept, groups)):
        raise RankError(f"{input_path}: a batch was rejected by the model: "
                        f"{field_message(batch_error.message)}")
    return _score_groups(scorer, kept, input_path, skip)


def _take(fields: Dict[str, List], rows: List[int]) -> Dict[str, List]:
    """The request fields of the given rows of a list."""
    return {k: [v[i] for i in rows] for k, v in fields.items()}


# "[field: text]" and the integer vectors printed after it (the shapes of `rank`'s checks).
_FIELD_MESSAGE = re.compile(r"\[((?:%s): [^\]]*)\]((?: \[[-\d ]*\])*)"
                            % "|".join(STRING_FIELDS + INT_FIELDS))


def field_message(message: str) -> str:
    """The field-naming text of an InvalidArgument raised by a tf.debugging assertion."""
    found = _FIELD_MESSAGE.search(message)
    if found:
        return found.group(1) + found.group(2)
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1] if lines else message


def write_lines_atomic(path: str, lines: Iterator[str]) -> None:
    """Streams `lines` (each gets a newline) into `path` under a temporary name in its
    folder, renamed into place when complete; the temporary is removed on any failure."""
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


def default_rejects_path(out_path: str) -> str:
    """OUT_STEM.rejects.tsv beside the submission (sub.csv -> sub.rejects.tsv)."""
    return os.path.splitext(out_path)[0] + ".rejects.tsv"


def rank_file(model_dir: str, input_path: str, out_path: str,
              scores_path: Optional[str] = None, batch_queries: int = 8,
              scorer: Optional[SavedModelScorer] = None,
              first_stage: bool = False, on_bad_row: str = "skip",
              rejects_path: Optional[str] = None) -> Dict:
    """Ranks every query of a TSV and writes the submission (and optionally all scores).

    Args:
      model_dir: SavedModel directory or export base; input_path: competition TSV;
      out_path: submission CSV; scores_path: optional per-row scores TSV (scored rows);
      batch_queries: lists per `rank` call; scorer: a scorer to use instead of loading
      model_dir; first_stage: rank by first-stage scores (when loading model_dir);
      on_bad_row: "skip" (leave bad rows out, list them in the rejects file) or "fail"
      (RankError at the first); rejects_path: default default_rejects_path(out_path).
    Returns:
      {"queries", "candidates" (scored), "padded_queries", "rejected_rows",
       "unscored_queries" (no candidate left), "rejects_path" (None with "fail"),
       "reasons" ({reason: rows})}.
    Raises:
      RankError: a bad file; with "fail", a bad row.
    """
    if batch_queries < 1:
        raise ValueError("batch_queries must be >= 1")
    if on_bad_row not in BAD_ROW_POLICIES:
        raise ValueError(f"on_bad_row must be one of {BAD_ROW_POLICIES}, got {on_bad_row!r}")
    skip = on_bad_row == "skip"
    rejects: Optional[List[Reject]] = [] if skip else None
    owned = scorer is None
    scorer = scorer or SavedModelScorer(model_dir, first_stage=first_stage)
    ranked: List[Tuple[int, List[int]]] = []
    pool: Dict[int, None] = {}          # every product id, in order of first appearance
    score_lines: List[str] = ["query_id\tproduct_id\tscore"] if scores_path else []
    candidates = 0
    unscored: List[int] = []
    model_rejects: List[Reject] = []

    def flush(batch):
        nonlocal candidates
        for g, s in zip(*_score_groups(scorer, batch, input_path, skip)):
            model_rejects.extend(r for r in g.rejected if r.reason == MODEL_REASON)
            ids = top_k(g.product_ids, s)
            # Rejected rows that are still readable candidates of this query come after the
            # scored ones, in file order (see the module docstring).
            for r in g.rejected:
                if len(ids) < schema.NDCG_K and r.product_id is not None and \
                        r.product_id not in ids:
                    ids.append(r.product_id)
            if not g.product_ids:
                unscored.append(g.query_id)
            ranked.append((g.query_id, ids))
            candidates += len(g.product_ids)
            if scores_path:
                score_lines.extend(f"{g.query_id}\t{p}\t{float(v):.9g}"
                                   for p, v in zip(g.product_ids, s))

    batch: List[QueryGroup] = []
    for group in iter_query_groups(input_path, rejects):
        pool.update(dict.fromkeys(group.product_ids))
        pool.update(dict.fromkeys(r.product_id for r in group.rejected
                                  if r.product_id is not None))
        batch.append(group)
        if len(batch) == batch_queries:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if owned:
        scorer.close()
    if not ranked:
        raise RankError(f"{input_path}: no data rows" +
                        (f" ({len(rejects)} rejected)" if rejects else ""))

    padded = []
    for qid, ids in ranked:
        if len(ids) < schema.NDCG_K:
            fill = [p for p in pool if p not in ids][:schema.NDCG_K - len(ids)]
            if len(ids) + len(fill) < schema.NDCG_K:
                raise RankError(f"{input_path}: only {len(pool)} distinct product ids in the "
                                f"file, cannot list {schema.NDCG_K} per query")
            ids.extend(fill)
            padded.append(qid)
    if padded:
        print(f"mmrecall rank: {len(padded)} queries had fewer than {schema.NDCG_K} candidates "
              f"and were completed with other queries' products: {padded[:10]}", file=sys.stderr)

    all_rejects = sorted((rejects or []) + model_rejects)
    if skip:
        rejects_path = rejects_path or default_rejects_path(out_path)
        write_lines_atomic(rejects_path, ["\t".join(REJECTS_HEADER)] + [
            "\t".join("" if v is None else str(v) for v in r) for r in all_rejects])
    write_lines_atomic(out_path, [",".join(schema.SUBMISSION_HEADER)] +
                  [",".join(map(str, [qid] + ids)) for qid, ids in ranked])
    if scores_path:
        write_lines_atomic(scores_path, score_lines)
    reasons: Dict[str, int] = {}
    for r in all_rejects:
        reasons[r.reason] = reasons.get(r.reason, 0) + 1
    return {"queries": len(ranked), "candidates": candidates, "padded_queries": len(padded),
            "rejected_rows": len(all_rejects), "unscored_queries": len(unscored),
            "rejects_path": rejects_path if skip else None, "reasons": reasons}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`mmrecall rank`: returns the exit status (1 on a bad input file or request)."""
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
    parser.add_argument("--first-stage", action="store_true",
                        help="rank by the rank signature's first_stage_scores (the pointwise "
                             "model alone) instead of its served, list-aware scores")
    parser.add_argument("--on-bad-row", choices=BAD_ROW_POLICIES, default="skip",
                        help="skip (default): leave rows that prep's validator or the model "
                             "refuses out, list them in the rejects file, exit 0; fail: stop "
                             "at the first, exit 1, write nothing")
    parser.add_argument("--rejects", default=None,
                        help="rejects file (default: OUT_STEM.rejects.tsv beside --out)")
    args = parser.parse_args(argv)
    try:
        stats = rank_file(args.model, args.input, args.out, args.scores, args.batch_queries,
                          first_stage=args.first_stage, on_bad_row=args.on_bad_row,
                          rejects_path=args.rejects)
    except RankError as e:
        print(f"mmrecall rank: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # a missing --model / --input, a read-only or full --out, ...
        line = str(e) if e.filename is None else os_error_line(e, args.out, rerun="rerun")
        print(f"mmrecall rank: {line}", file=sys.stderr)
        return 1
    if stats["rejected_rows"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(stats["reasons"].items()))
        print(f"mmrecall rank: {stats['rejected_rows']} bad rows skipped ({reasons}); "
              f"{stats['unscored_queries']} queries left with no scored candidate -> "
              f"{stats['rejects_path']}", file=sys.stderr)
    print(f"mmrecall rank: {stats['queries']} queries, {stats['candidates']} candidates "
          f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
