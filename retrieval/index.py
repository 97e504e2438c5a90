"""`mmrecall index`: embeds a catalogue with an export's product tower into an index directory.

    mmrecall index --model EXPORT_DIR --products TSV [TSV ...] --out INDEX_DIR
                   [--batch-size 256] [--chunk-rows 65536] [--ann scann|faiss-ivf|exact]
                   [--served-out EXPORT_BASE [--served-k 100] [--served-expand-weight 1]
                    [--served-expand-m 3]] [--no-progress]
                   [--runner local|beam [--beam-args="BEAM PIPELINE OPTIONS"]]

Streams the rows (one reader thread validates and decodes the next batch while TensorFlow,
which uses every core, embeds the current one), so memory holds two batches and one chunk
of embeddings, plus the product ids seen (catalogue.IdSet: a sorted int64 array, ~8 bytes
per product)
and, at the end, the embeddings for the ANN build. Output layout, resumption and atomicity:
retrieval/store.py. With --served-out it also writes the served retrieval SavedModel
(retrieval/served.py). With --runner beam an Apache Beam pipeline embeds the catalogue
instead (retrieval/beam_embed.py; the same index directory).
"""
import argparse
import os
import queue
import shlex
import sys
import threading
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from data_prep import tsv
from retrieval import ann as ann_lib
from retrieval import catalogue
from retrieval import expansion as expansion_lib
from retrieval import model as model_lib
from retrieval import store

_END = object()


def _batches(paths, start, seen, batch_size: int, chunk_rows: int, done: int, out: queue.Queue):
    """Reader thread: puts lists of rows (Product/Reject/Duplicate) holding at most
    batch_size products, cut at chunk boundaries, then _END (or the exception raised)."""
    try:
        items: List = []
        products = 0
        for item in catalogue.iter_rows(paths, start, seen):
            items.append(item)
            if isinstance(item, catalogue.Product):
                products += 1
                done += 1
                if products == batch_size or done % chunk_rows == 0:
                    out.put(items)
                    items, products = [], 0
        if items:
            out.put(items)
        out.put(_END)
    except BaseException as e:  # handed to the main thread, which raises it
        out.put(e)


class _Progress:
    """One status line on stderr, rewritten at most twice a second."""

    def __init__(self, enabled: bool, resumed: int):
        self.enabled, self.start, self.last = enabled, time.time(), 0.0
        self.resumed = resumed

    def show(self, products: int, rejected: int, duplicates: int, final: bool = False):
        now = time.time()
        if not self.enabled or (not final and now - self.last < 0.5):
            return
        self.last = now
        rate = (products - self.resumed) / max(now - self.start, 1e-9)
        print(f"\rmmrecall index: {products} products, {rejected} rejected, {duplicates} "
              f"duplicates, {rate:.0f} products/s", end="\n" if final else "", file=sys.stderr,
              flush=True)


def build_index(model_dir: str, products: Sequence[str], out_dir: str, batch_size: int = 256,
                chunk_rows: int = 65536, ann_kind: Optional[str] = None,
                ann_params: Optional[Dict[str, object]] = None, progress: bool = False,
                on_chunk=None, model: Optional[model_lib.ExportModel] = None) -> Dict[str, object]:
    """Indexes the catalogue TSVs with the export's product tower (see module docstring).

    Args:
      model_dir: SavedModel directory or export base.
      products: catalogue TSVs (competition format; query columns ignored).
      out_dir: the index directory (replaced when the run finishes).
      batch_size: products per embed_product call; chunk_rows: products per resumable chunk
        (a multiple of batch_size keeps batches identical on resumption).
      ann_kind, ann_params: the ANN index (ann.build); default by catalogue size.
      progress: a status line on stderr.
      on_chunk: fn(chunk number, chunk meta) after each chunk is written (tests).
      model: an already loaded ExportModel of model_dir.
    Returns:
      index.json's content plus "resumed_chunks" and "restarted".
    Raises:
      store.StoreError: an empty catalogue. tsv.TsvFormatError: a bad file header.
    """
    if batch_size < 1 or chunk_rows < batch_size or chunk_rows % batch_size:
        raise ValueError(f"chunk_rows ({chunk_rows}) must be a multiple of batch_size "
                         f"({batch_size}) >= 1")
    paths = [os.path.abspath(p) for p in products]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: no such catalogue file")
    owned = model is None
    model = model or model_lib.ExportModel(model_dir)
    try:
        run = {"fingerprint": model.fingerprint, "catalogue": [catalogue.file_stamp(p)
                                                               for p in paths],
               "batch_size": batch_size, "chunk_rows": chunk_rows, "format": store.FORMAT_VERSION}
        writer = store.ChunkWriter(out_dir, run)
        resumed = len(writer.chunks)
        done = sum(c["rows"] for c in writer.chunks)
        rejected = sum(c["rejected"] for c in writer.chunks)
        duplicates = sum(c["duplicates"] for c in writer.chunks)
        bar = _Progress(progress, done)
        # Two batches in flight: bounded memory whatever the catalogue size.
        batches: queue.Queue = queue.Queue(maxsize=2)
        reader = threading.Thread(target=_batches, daemon=True, args=(
            paths, writer.position, writer.seen_ids(), batch_size, chunk_rows, done, batches))
        reader.start()
        ids: List[int] = []
        embeddings: List[np.ndarray] = []
        locations: List = []
        rejects: List[catalogue.Reject] = []
        chunk_duplicates = 0
        end = writer.position or catalogue.Position(0, 0, 1)

        def flush(end_position):
            nonlocal ids, embeddings, locations, rejects, chunk_duplicates
            meta = writer.write(np.asarray(ids, np.int64),
                                np.concatenate(embeddings) if embeddings else
                                np.zeros([0, model.width], np.float32),
                                np.asarray(locations, np.int64).reshape(-1, 3), rejects,
                                chunk_duplicates, end_position)
            if on_chunk:
                on_chunk(len(writer.chunks) - 1, meta)
            ids, embeddings, locations, rejects, chunk_duplicates = [], [], [], [], 0

        while True:
            items = batches.get()
            if items is _END:
                break
            if isinstance(items, BaseException):
                raise items
            batch = [i for i in items if isinstance(i, catalogue.Product)]
            rejects += [i for i in items if isinstance(i, catalogue.Reject)]
            rejected += sum(isinstance(i, catalogue.Reject) for i in items)
            dup = sum(isinstance(i, catalogue.Duplicate) for i in items)
            chunk_duplicates += dup
            duplicates += dup
            if batch:
                embeddings.append(model.embed_products(
                    {k: [p.fields[k] for p in batch] for k in model_lib.PRODUCT_FIELDS}))
                ids += [p.product_id for p in batch]
                locations += [p.location for p in batch]
                done += len(batch)
                end = batch[-1].end
                if len(ids) == chunk_rows:
                    flush(end)
            bar.show(done, rejected, duplicates)
        reader.join()
        if ids or rejects or chunk_duplicates:
            # The last chunk ends at the end of the stream (rows after its last product).
            flush(catalogue.Position(len(paths), 0, 1))
        bar.show(done, rejected, duplicates, final=True)

        def build_ann(emb, ann_dir):
            return ann_lib.build(emb, ann_dir, ann_kind, ann_params)

        meta = {"fingerprint": model.fingerprint,
                "fingerprint_kind": model_lib.FINGERPRINT_KIND,
                "model": model.path, "width": model.width,
                "catalogue": run["catalogue"]}
        writer.finish(meta, build_ann)
        result = store.Index(out_dir).meta
        return dict(result, resumed_chunks=resumed, restarted=writer.restarted)
    finally:
        if owned:
            model.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`mmrecall index`: returns the exit status (1 on a bad catalogue or an empty one)."""
    parser = argparse.ArgumentParser(
        prog="mmrecall index",
        description="embed a catalogue's products with an export's product tower and write "
                    "an index directory (ids, embeddings, fingerprint, ANN index)")
    parser.add_argument("--model", required=True,
                        help="SavedModel directory or its export base (newest version used)")
    parser.add_argument("--products", required=True, nargs="+",
                        help="catalogue TSVs in the competition format (query columns ignored; "
                             "a product id seen before is embedded once, from its first row)")
    parser.add_argument("--out", required=True, help="index directory to write")
    parser.add_argument("--batch-size", type=int, default=256,
                        help="products per embed_product call (default 256)")
    parser.add_argument("--chunk-rows", type=int, default=65536,
                        help="products per resumable chunk, a multiple of --batch-size "
                             "(default 65536)")
    parser.add_argument("--ann", choices=ann_lib.KINDS, default=None,
                        help=f"ANN index kind (default {ann_lib.DEFAULT_KIND}, or exact below "
                             f"{ann_lib.MIN_ANN_PRODUCTS} products)")
    parser.add_argument("--served-out", default=None,
                        help="also write the served retrieval SavedModel under this export base")
    parser.add_argument("--served-k", type=int, default=100,
                        help="products the served retrieval returns per query (default 100)")
    expansion_lib.add_arguments(parser, "served-", "the served retrieval's")
    parser.add_argument("--no-progress", action="store_true", help="no status line")
    parser.add_argument("--runner", choices=("local", "beam"), default="local",
                        help="local: this process embeds (resumable); beam: an Apache Beam "
                             "pipeline embeds (pip install -e '.[beam]'; no resumption)")
    parser.add_argument("--beam-args", default="",
                        help="with --runner beam: Beam pipeline options as one string, e.g. "
                             "--beam-args='--runner=FlinkRunner --flink_master=HOST:8081' "
                             "(default: DirectRunner)")
    args = parser.parse_args(argv)
    if args.beam_args and args.runner != "beam":
        parser.error("--beam-args needs --runner beam")
    served_expansion = expansion_lib.from_arguments(parser, args, "served-")
    try:
        if args.runner == "beam":
            try:
                from retrieval import beam_embed  # noqa: E402  # apache-beam: an optional extra
            except ImportError as e:
                print(f"mmrecall index: --runner beam needs apache-beam ({e}): "
                      f"pip install -e '.[beam]'", file=sys.stderr)
                return 1
            meta = beam_embed.build_index(args.model, args.products, args.out,
                                          args.batch_size, args.chunk_rows, args.ann,
                                          beam_args=shlex.split(args.beam_args))
        else:
            meta = build_index(args.model, args.products, args.out, args.batch_size,
                               args.chunk_rows, args.ann, progress=not args.no_progress)
    except (store.StoreError, model_lib.ModelError, tsv.TsvFormatError, FileNotFoundError,
            ValueError) as e:
        print(f"mmrecall index: {e}", file=sys.stderr)
        return 1
    print(f"mmrecall index: {meta['count']} products ({meta['rejected']} rejected rows -> "
          f"{os.path.join(args.out, 'rejects.tsv')}, {meta['duplicates']} duplicate rows), "
          f"ANN {meta['ann']['kind']}, fingerprint {meta['fingerprint'][:16]} -> {args.out}"
          + (f" (resumed after {meta['resumed_chunks']} chunks)" if meta["resumed_chunks"]
             else ""))
    if args.served_out:
        from retrieval import served  # noqa: E402  # only with --served-out: builds a graph

        path = served.export_served_retrieval(args.out, args.model, args.served_out,
                                              k=args.served_k, expansion=served_expansion)
        print(f"mmrecall index: served retrieval SavedModel -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
