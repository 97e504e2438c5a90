"""`mmrecall search`: recall a query's products from an index, rerank them with the model.

    mmrecall search --index INDEX_DIR --model EXPORT_DIR (--query TEXT | --queries TSV)
                    [--k 5] [--rerank 100] [--first-stage] [--exact] [--out FILE]
                    [--expand-weight 1] [--expand-m 3]

1. The query is embedded by the export's `embed_query`.
2. Query expansion (retrieval/expansion.py; `--expand-weight 0` turns it off): the index's
   `--expand-m` nearest products form a centroid and the query moves towards it.
3. The index returns the expanded query's `--rerank` nearest products by dot product (ANN;
   `--exact`: brute force).
4. Their rows are re-read from the catalogue files (byte locations kept in the index) and
   sent, as one candidate list per query, to the export's `rank` signature: the served
   ranking, pair score and list stage (`--first-stage`: the pair score alone, as
   serving_default); with expansion the centroid similarity is added to its z-scores at the
   same weight. `--rerank 0` keeps the retrieval order.
5. The top `--k` are printed (`--query`: rank, product id, score, retrieval score) or, with
   `--queries` (a TSV with `query` and `query_id` columns, others ignored), written as the
   submission CSV (query-id,product1..product5) that `mmrecall score` reads.

The model must be the one whose product tower built the index (fingerprints compared).
"""
import argparse
import sys
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np

from data_prep import schema
from export import rank as rank_lib
from export import signatures as sig_lib
from retrieval import catalogue
from retrieval import expansion as expansion_lib
from retrieval import model as model_lib
from retrieval import store


class SearchError(RuntimeError):
    """A bad request: bad queries file, k, or a catalogue too small."""


class Hit(NamedTuple):
    """One result: product id, final score (rerank score, or retrieval score), retrieval
    score (dot product of the embeddings)."""
    product_id: int
    score: float
    retrieval_score: float


def read_queries(path: str) -> List[Tuple[str, str]]:
    """(query_id, query) of a TSV with `query` and `query_id` columns (others ignored); a
    query repeated on contiguous rows (a competition file's candidate rows) counts once.

    Raises:
      SearchError: a missing column, an empty query, or no query at all.
    """
    out: List[Tuple[str, str]] = []
    seen = set()
    # Lines are split by hand: a competition file's base64 columns exceed the csv module's
    # field limit, and only two columns are decoded.
    with open(path, "rb") as f:
        first = f.readline()
        header = first.decode("utf-8-sig", "replace").rstrip("\r\n").split("\t")
        if not first or "query" not in header or "query_id" not in header:
            raise SearchError(f"{path}:1: needs a header with `query` and `query_id` columns, "
                              f"got {header if first else None}")
        qcol, icol = header.index("query"), header.index("query_id")
        for line_no, line in enumerate(f, start=2):
            values = line.rstrip(b"\r\n").split(b"\t")
            if values == [b""]:
                continue
            if len(values) <= max(qcol, icol):
                raise SearchError(f"{path}:{line_no}: {len(values)} columns, expected "
                                  f"{len(header)}")
            try:
                qid, text = values[icol].decode("utf-8"), values[qcol].decode("utf-8")
            except UnicodeDecodeError:
                raise SearchError(f"{path}:{line_no}: query or query_id is not UTF-8") from None
            if not text.strip():
                raise SearchError(f"{path}:{line_no}: empty query")
            if qid in seen:
                continue
            seen.add(qid)
            out.append((qid, text))
    if not out:
        raise SearchError(f"{path}: no query rows")
    return out


class Searcher:
    """An index and the export that built it: query text -> ranked products."""

    def __init__(self, index_dir: str, model_dir: str,
                 model: Optional[model_lib.ExportModel] = None,
                 expansion: expansion_lib.Expansion = expansion_lib.Expansion()):
        """Args:
          expansion: query expansion (retrieval/expansion.py); expansion_lib.OFF disables.
        Raises:
          store.StoreError: no finished index, or the model's product tower or width
            differ from the index's.
          ValueError: a negative expansion weight or m.
        """
        self.expansion = expansion_lib.checked(expansion)
        self.index = store.Index(index_dir)
        self.model = model or model_lib.ExportModel(model_dir)
        self._owned = model is None
        self.index.check_model(self.model.fingerprint, self.model.width, self.model.path)
        self._rows: Optional[catalogue.RowReader] = None

    def retrieve(self, texts: Sequence[str], k: int, exact: bool = False
                 ) -> Tuple[np.ndarray, np.ndarray]:
        """Query texts [B] -> (product ids int64 [B, k'], retrieval scores float32 [B, k']),
        best first, k' = min(k, P); -1 / -inf where the ANN found fewer. With expansion the
        scores are the expanded query's (q^ + weight * c^) dot products."""
        rows, scores, _ = self._retrieve_rows(texts, k, exact)
        return self._ids(rows), scores

    def _ids(self, rows: np.ndarray) -> np.ndarray:
        return np.where(rows >= 0, self.index.ids[np.maximum(rows, 0)], -1)

    def _retrieve_rows(self, texts: Sequence[str], k: int, exact: bool):
        """(rows int64 [B, k'], scores float32 [B, k'], centroids float32 [B, E] or None)."""
        queries = self.model.embed_queries(texts)                                   # [B, E]
        centroids = None
        if self.expansion.active:
            first, _ = self.index.search(queries, self.expansion.m, exact=exact)
            centroids = expansion_lib.centroids(self.index.embeddings, first)
            queries = expansion_lib.expanded_queries(queries, centroids,
                                                     self.expansion.weight)
        rows, scores = self.index.search(queries, k, exact=exact)
        return rows, scores, centroids

    def _fields(self, product_ids: Sequence[int]) -> Dict[str, List]:
        if self._rows is None:
            self._rows = self.index.row_reader()
        rows = self.index.row_of(product_ids)
        fields: Dict[str, List] = {k: [] for k in model_lib.PRODUCT_FIELDS}
        for pid, row in zip(product_ids, rows):
            for k, v in self._rows.fields(pid, self.index.locations[row]).items():
                fields[k].append(v)
        return fields

    def search(self, texts: Sequence[str], k: int = schema.NDCG_K, rerank: int = 100,
               exact: bool = False, first_stage: bool = False) -> List[List[Hit]]:
        """The top k products of each query.

        Args:
          texts: B query texts.
          k: results per query (capped at the catalogue size).
          rerank: candidates retrieved and reranked with `rank` (0: retrieval order, k
            retrieved).
          exact: brute-force retrieval instead of the ANN index.
          first_stage: rerank by the pair score alone (no list stage).
        Returns:
          B lists of min(k, P) Hits, best first. Hit.score is the `rank` score, or with
          expansion z(rank score) + weight * z(centroid similarity) over the list.
        """
        if k < 1 or rerank < 0:
            raise SearchError(f"k must be >= 1 and rerank >= 0 (got k {k}, rerank {rerank})")
        rows, retrieval_scores, centroids = self._retrieve_rows(texts, max(k, rerank), exact)
        found = [row >= 0 for row in rows]
        rows = [row[f] for row, f in zip(rows, found)]
        ids = [self._ids(row) for row in rows]
        retrieval_scores = [row[f] for row, f in zip(retrieval_scores, found)]
        if rerank == 0:
            return [[Hit(int(p), float(s), float(s)) for p, s in zip(row_ids[:k], scores[:k])]
                    for row_ids, scores in zip(ids, retrieval_scores)]
        # One `rank` call for the batch: each query's candidates are one list.
        lists = []
        for text, row_ids in zip(texts, ids):
            if not len(row_ids):
                raise SearchError(f"query {text!r}: the index returned no product; search "
                                  f"with --exact")
            fields = self._fields(row_ids.tolist())
            fields[sig_lib.QUERY] = [text.encode("utf-8")] * len(row_ids)
            lists.append(fields)
        results = []
        served = self.model.score_lists(lists, first_stage=first_stage)
        for q, (row_ids, row_scores, scores) in enumerate(zip(ids, retrieval_scores, served)):
            if centroids is not None:
                scores = expansion_lib.fused_scores(
                    scores, self.index.embeddings[rows[q]], centroids[q],
                    self.expansion.weight)
            # Ties keep the retrieval order (a stable sort over candidates best first).
            order = np.argsort(-scores.astype(np.float64), kind="stable")[:k]
            results.append([Hit(int(row_ids[i]), float(scores[i]), float(row_scores[i]))
                            for i in order])
        return results

    def close(self) -> None:
        """Closes the catalogue files and (if opened here) the model's Session."""
        if self._rows is not None:
            self._rows.close()
        if self._owned:
            self.model.close()


def _batched(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def search_file(searcher: Searcher, queries_path: str, out_path: Optional[str],
                rerank: int = 100, exact: bool = False, first_stage: bool = False,
                batch_queries: int = 16) -> int:
    """Writes the submission CSV (query-id,product1..product5) of every query of a TSV.

    Args:
      out_path: the CSV (written atomically); None: stdout.
    Returns:
      The number of queries.
    Raises:
      SearchError: bad queries file, or fewer than 5 products in the catalogue.
    """
    if len(searcher.index) < schema.NDCG_K:
        raise SearchError(f"{searcher.index.path}: {len(searcher.index)} products, a "
                          f"submission line needs {schema.NDCG_K}")
    queries = read_queries(queries_path)
    lines = [",".join(schema.SUBMISSION_HEADER)]
    for batch in _batched(queries, batch_queries):
        hits = searcher.search([t for _, t in batch], schema.NDCG_K, rerank, exact, first_stage)
        for (qid, _), row in zip(batch, hits):
            if len(row) < schema.NDCG_K:
                raise SearchError(f"query {qid}: the index returned {len(row)} products, "
                                  f"fewer than {schema.NDCG_K}; search with --exact")
            lines.append(",".join([qid] + [str(h.product_id) for h in row]))
    if out_path:
        rank_lib.write_lines_atomic(out_path, lines)
    else:
        print("\n".join(lines))
    return len(queries)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`mmrecall search`: returns the exit status (1 on a bad index, model or request)."""
    parser = argparse.ArgumentParser(
        prog="mmrecall search",
        description="retrieve a query's products from an index with the export's query tower "
                    "and rerank them with its served score")
    parser.add_argument("--index", required=True, help="index directory (mmrecall index)")
    parser.add_argument("--model", required=True,
                        help="the SavedModel that built the index (directory or export base)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--query", help="one query text")
    which.add_argument("--queries", help="TSV with `query` and `query_id` columns: writes the "
                                         "submission CSV (query-id,product1..product5)")
    parser.add_argument("--k", type=int, default=schema.NDCG_K,
                        help="results per query with --query (default 5; --queries writes 5)")
    parser.add_argument("--rerank", type=int, default=100,
                        help="candidates retrieved and reranked with the model (default 100; "
                             "0 keeps the retrieval order)")
    parser.add_argument("--first-stage", action="store_true",
                        help="rerank by the pair score alone (no list stage)")
    parser.add_argument("--exact", action="store_true",
                        help="brute-force retrieval instead of the ANN index")
    expansion_lib.add_arguments(parser, "", "the search's")
    parser.add_argument("--out", default=None, help="write here instead of stdout")
    args = parser.parse_args(argv)
    expansion = expansion_lib.from_arguments(parser, args, "")
    if args.queries and args.k != schema.NDCG_K:
        parser.error(f"--queries writes the submission format: {schema.NDCG_K} products per "
                     f"query (drop --k)")
    searcher = None
    try:
        searcher = Searcher(args.index, args.model, expansion=expansion)
        if args.queries:
            n = search_file(searcher, args.queries, args.out, args.rerank, args.exact,
                            args.first_stage)
            if args.out:
                print(f"mmrecall search: {n} queries -> {args.out}")
            return 0
        hits = searcher.search([args.query], args.k, args.rerank, args.exact,
                               args.first_stage)[0]
        lines = ["rank\tproduct_id\tscore\tretrieval_score"] + [
            f"{i}\t{h.product_id}\t{h.score:.6g}\t{h.retrieval_score:.6g}"
            for i, h in enumerate(hits, start=1)]
        if args.out:
            rank_lib.write_lines_atomic(args.out, lines)
        else:
            print("\n".join(lines))
        return 0
    except (store.StoreError, SearchError, catalogue.CatalogueError,
            model_lib.ModelError, OSError) as e:
        print(f"mmrecall search: {e}", file=sys.stderr)
        return 1
    finally:
        if searcher is not None:
            searcher.close()


if __name__ == "__main__":
    sys.exit(main())
