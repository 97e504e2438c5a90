"""`mmrecall index --runner beam`: the catalogue embedded by an Apache Beam pipeline.

The embedding step is the one that grows with the catalogue, so it runs on Beam (any
runner: DirectRunner by default, Flink, Spark or Dataflow through standard pipeline
options); the index directory is then finished on the launching machine by the same
store.ChunkWriter as `mmrecall index`, so it is identical in content to the local path's
(same ids in catalogue order, locations, rejects and counts; embeddings equal within float
tolerance, since batches differ; same fingerprint).

    headers checked, files cut into byte ranges (launcher)
      -> ReadRange: the rows whose line starts in a range, validated as catalogue.iter_rows
         does (catalogue.validate_line); bad rows to a tagged output
      -> CombinePerKey(product id): the first row by (file, offset), and the row count
      -> RunInference(KeyedModelHandler(ProductTowerHandler)): embed_product in batches,
         the export loaded once per worker (retrieval.model.ExportModel, the TF1 Session
         `mmrecall index` runs) and its fingerprint checked against the launcher's
      -> shards in SHARDS_DIR: ids int64 [S], embeddings float32 [S, E], locations int64
         [S, 3], duplicate rows; rejects as JSON
    merge (launcher): shards sorted by location, cut into chunks, ChunkWriter.finish
    (concatenation, ANN build, index.json, atomic rename).

Every worker must reach the catalogue files, the export and the shard directory by the
same paths (a shared filesystem). The launcher holds the ids and locations of the whole
catalogue while merging (32 bytes a product) and memory-maps the shards' embeddings.
No resumption: a rerun starts the pipeline again (the runner retries failed work itself;
a retried bundle's duplicate shard is dropped in the merge).
"""
import json
import os
import shutil
import uuid
from typing import Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference import base as inference
from apache_beam.options.pipeline_options import PipelineOptions

from data_prep import tsv
from retrieval import ann as ann_lib
from retrieval import catalogue
from retrieval import model as model_lib
from retrieval import store

RANGE_BYTES = 64 << 20        # catalogue bytes one ReadRange element reads
SHARDS_SUFFIX = ".beam"       # INDEX_DIR.beam/: the pipeline's shards, removed when done
REJECTS = "rejects"
_ARRAYS = ("ids", "embeddings", "locations")


def file_ranges(paths: Sequence[str], range_bytes: int = RANGE_BYTES
                ) -> List[Tuple[int, int, int]]:
    """Checks each file's header and cuts its data into byte ranges.

    Returns:
      [(file index, start byte, end byte)]: the data lines of every file, in order.
    Raises:
      data_prep.tsv.TsvFormatError: a file is empty or its header is wrong.
    """
    ranges = []
    for file_index, path in enumerate(paths):
        with open(path, "rb") as f:
            header = f.readline()
        tsv.check_header(path, header or None)
        size = os.path.getsize(path)
        ranges += [(file_index, start, min(start + range_bytes, size))
                   for start in range(len(header), size, range_bytes)]
    return ranges


class ReadRange(beam.DoFn):
    """(file index, start, end) -> the rows whose line starts in [start, end).

    Main output: (product id, ((file, offset, length), request fields)); REJECTS output:
    (file, offset, field, reason, detail) of each row the validator refuses.
    """

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)

    def process(self, element):
        file_index, start, end = element
        with open(self._paths[file_index], "rb") as f:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()                 # a line begun before start: the previous range's
            while (offset := f.tell()) < end:
                raw = f.readline()
                if not raw:
                    break
                line = raw.rstrip(b"\r\n")
                if not line:
                    continue
                try:
                    product_id, fields = catalogue.validate_line(line)
                except tsv.RowError as e:
                    yield beam.pvalue.TaggedOutput(
                        REJECTS, (file_index, offset, e.field, e.reason, e.detail))
                    continue
                yield product_id, ((file_index, offset, len(line)), fields)


class FirstRow(beam.CombineFn):
    """A product's rows -> (its first row by location, how many rows it has)."""

    def create_accumulator(self):
        return None, 0

    def add_input(self, accumulator, row):
        return self.merge_accumulators([accumulator, (row, 1)])

    def merge_accumulators(self, accumulators):
        best, count = None, 0
        for row, n in accumulators:
            if row is not None and (best is None or row[0] < best[0]):
                best = row
            count += n
        return best, count

    def extract_output(self, accumulator):
        return accumulator


class ProductTowerHandler(inference.ModelHandler):
    """RunInference over the export's `embed_product` signature.

    Examples are request-field dicts (catalogue.validate_line's); each prediction is the
    product's float32 [E] embedding. The model is loaded once per worker process.
    """

    def __init__(self, model_dir: str, fingerprint: str, batch_size: int):
        """Args:
          model_dir: SavedModel directory or export base.
          fingerprint: the product tower's fingerprint the launcher read; a worker whose
            copy of the export differs stops with an error naming both.
          batch_size: products per embed_product call.
        """
        super().__init__()
        self._model_dir, self._fingerprint, self._batch_size = model_dir, fingerprint, batch_size

    def load_model(self) -> model_lib.ExportModel:
        model = model_lib.ExportModel(self._model_dir)
        if model.fingerprint != self._fingerprint:
            raise model_lib.ModelError(
                f"{model.path}: product tower fingerprint {model.fingerprint} on this worker, "
                f"{self._fingerprint} on the launcher; give every worker the same export")
        return model

    def run_inference(self, batch, model, inference_args=None):
        embeddings = model.embed_products(
            {k: [fields[k] for fields in batch] for k in model_lib.PRODUCT_FIELDS})  # [B, E]
        return [inference.PredictionResult(None, e) for e in embeddings]

    def batch_elements_kwargs(self):
        return {"min_batch_size": self._batch_size, "max_batch_size": self._batch_size}


class WriteShard(beam.DoFn):
    """A batch of embedded products, or of rejects, -> one shard file set in shard_dir,
    each file written under a temporary name and renamed; the .json last."""

    def __init__(self, shard_dir: str, rejects: bool = False):
        self._dir, self._rejects = shard_dir, rejects

    def process(self, batch):
        name = os.path.join(self._dir, uuid.uuid4().hex)
        if self._rejects:                 # (file, offset, field, reason, detail)
            meta = {"rejects": [list(r) for r in batch]}
        else:                             # (id, location, duplicate rows, embedding [E])
            arrays = {"ids": np.array([b[0] for b in batch], np.int64),
                      "locations": np.array([b[1] for b in batch], np.int64).reshape(-1, 3),
                      "embeddings": np.stack([b[3] for b in batch]).astype(np.float32),
                      "duplicates": np.array([b[2] for b in batch], np.int64)}
            for key, value in arrays.items():
                with open(f"{name}.{key}.npy.tmp", "wb") as f:
                    np.save(f, value)
                os.replace(f"{name}.{key}.npy.tmp", f"{name}.{key}.npy")
            meta = {"rows": len(batch)}
        with open(name + ".json.tmp", "w", encoding="utf-8") as f:
            json.dump(meta, f)
        os.replace(name + ".json.tmp", name + ".json")


def run_pipeline(paths: Sequence[str], model_dir: str, fingerprint: str, shard_dir: str,
                 batch_size: int, shard_rows: int, beam_args: Sequence[str] = (),
                 range_bytes: int = RANGE_BYTES) -> None:
    """Runs the embedding pipeline (module docstring) and waits for it.

    Args:
      paths: catalogue TSVs (absolute; headers already checked).
      model_dir, fingerprint: the export and its product tower's fingerprint.
      shard_dir: an empty directory every worker can write.
      batch_size: products per embed_product call; shard_rows: at most this many per shard.
      beam_args: Beam pipeline options, e.g. ["--runner=FlinkRunner", ...] (DirectRunner
        when none names a runner).
      range_bytes: catalogue bytes per read element.
    """
    handler = inference.KeyedModelHandler(
        ProductTowerHandler(model_dir, fingerprint, batch_size))
    with beam.Pipeline(options=PipelineOptions(list(beam_args))) as p:
        rows = (p | "Ranges" >> beam.Create(file_ranges(paths, range_bytes))
                | "Spread" >> beam.Reshuffle()
                | "Read" >> beam.ParDo(ReadRange(paths)).with_outputs(REJECTS, main="rows"))
        (rows.rows
         | "FirstRow" >> beam.CombinePerKey(FirstRow())
         # key: (id, location, duplicate rows); example: the request fields
         | "Key" >> beam.MapTuple(lambda pid, first: ((pid, first[0][0], first[1] - 1),
                                                      first[0][1]))
         | "Embed" >> inference.RunInference(handler)
         | "Flatten" >> beam.MapTuple(lambda key, result: key + (result.inference,))
         | "Batch" >> beam.BatchElements(min_batch_size=shard_rows, max_batch_size=shard_rows)
         | "Write" >> beam.ParDo(WriteShard(shard_dir)))
        (rows[REJECTS]
         | "BatchRejects" >> beam.BatchElements(min_batch_size=1024, max_batch_size=1024)
         | "WriteRejects" >> beam.ParDo(WriteShard(shard_dir, rejects=True)))


def _line_numbers(path: str, offsets) -> Dict[int, int]:
    """{byte offset: 1-based line number} of line starts in a file (one pass up to the last)."""
    lines, count, pos = {}, 0, 0
    with open(path, "rb") as f:
        for offset in sorted(set(offsets)):
            while pos < offset:
                block = f.read(min(1 << 20, offset - pos))
                if not block:
                    break
                count += block.count(b"\n")
                pos += len(block)
            lines[offset] = count + 1
    return lines


def read_shards(shard_dir: str, paths: Sequence[str]):
    """The pipeline's shards, in catalogue order.

    Returns:
      (ids int64 [P], locations int64 [P, 3], embeddings: fn(rows int64 [n]) -> float32
      [n, E] of those catalogue-order rows, duplicate rows, rejects [catalogue.Reject] in
      catalogue order).
    """
    metas = {}
    for name in sorted(os.listdir(shard_dir)):
        if name.endswith(".json"):
            with open(os.path.join(shard_dir, name), encoding="utf-8") as f:
                metas[name[:-len(".json")]] = json.load(f)
    shards = [n for n, m in metas.items() if "rejects" not in m]
    load = {key: [np.load(os.path.join(shard_dir, f"{n}.{key}.npy"),
                          mmap_mode="r" if key == "embeddings" else None) for n in shards]
            for key in _ARRAYS + ("duplicates",)}
    ids = np.concatenate(load["ids"] or [np.zeros([0], np.int64)])
    locations = np.concatenate(load["locations"] or [np.zeros([0, 3], np.int64)])
    order = np.lexsort((locations[:, 1], locations[:, 0]))
    # A retried bundle may have written its shard twice: each product once.
    keep = np.ones(len(order), bool)
    keep[1:] = ids[order][1:] != ids[order][:-1]
    order = order[keep]
    duplicates = int(np.concatenate(load["duplicates"] or [np.zeros([0], np.int64)])[order].sum())
    starts = np.cumsum([0] + [len(x) for x in load["ids"]])

    def embeddings(rows: np.ndarray) -> np.ndarray:
        rows = order[rows]
        shard = np.searchsorted(starts, rows, side="right") - 1
        out = np.empty([len(rows), load["embeddings"][0].shape[1]], np.float32)   # [n, E]
        for k in np.unique(shard):
            mask = shard == k
            out[mask] = load["embeddings"][k][rows[mask] - starts[k]]
        return out

    raw = sorted({tuple(r) for m in metas.values() for r in m.get("rejects", [])})
    lines = {f: _line_numbers(paths[f], [r[1] for r in raw if r[0] == f])
             for f in {r[0] for r in raw}}
    rejects = [catalogue.Reject(paths[f], lines[f][offset], field, reason, detail)
               for f, offset, field, reason, detail in raw]
    return ids[order], locations[order], embeddings, duplicates, rejects


def build_index(model_dir: str, products: Sequence[str], out_dir: str, batch_size: int = 256,
                chunk_rows: int = 65536, ann_kind: Optional[str] = None,
                ann_params: Optional[Dict[str, object]] = None, beam_args: Sequence[str] = (),
                range_bytes: int = RANGE_BYTES) -> Dict[str, object]:
    """`mmrecall index --runner beam`: index.build_index's index directory, the embedding
    done by the Beam pipeline (module docstring).

    Args:
      model_dir, products, out_dir, batch_size, chunk_rows, ann_kind, ann_params: as
        index.build_index (chunk_rows also caps a shard).
      beam_args: Beam pipeline options (DirectRunner when none names a runner).
      range_bytes: catalogue bytes per read element (the unit of read parallelism).
    Returns:
      index.json's content plus "resumed_chunks" (0) and "restarted".
    Raises:
      store.StoreError: an empty catalogue. tsv.TsvFormatError: a bad file header.
      model_lib.ModelError: the export lacks a signature, or a worker's export differs.
    """
    if batch_size < 1 or chunk_rows < batch_size:
        raise ValueError(f"chunk_rows ({chunk_rows}) must be >= batch_size ({batch_size}) >= 1")
    paths = [os.path.abspath(p) for p in products]
    for p in paths:
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: no such catalogue file")
    file_ranges(paths, range_bytes)                     # header errors before any work
    model = model_lib.ExportModel(model_dir)
    try:
        fingerprint, width, path = model.fingerprint, model.width, model.path
    finally:
        model.close()
    shard_dir = out_dir.rstrip("/") + SHARDS_SUFFIX
    shutil.rmtree(shard_dir, ignore_errors=True)
    os.makedirs(shard_dir)
    try:
        run_pipeline(paths, path, fingerprint, shard_dir, batch_size, chunk_rows, beam_args,
                     range_bytes)
        restarted = _write_index(out_dir, shard_dir, paths, fingerprint, width, path,
                                 chunk_rows, ann_kind, ann_params)
    finally:
        shutil.rmtree(shard_dir, ignore_errors=True)
    return dict(store.Index(out_dir).meta, resumed_chunks=0, restarted=restarted)


def _write_index(out_dir: str, shard_dir: str, paths: Sequence[str], fingerprint: str,
                 width: int, model_path: str, chunk_rows: int, ann_kind: Optional[str],
                 ann_params: Optional[Dict[str, object]]) -> bool:
    """The shards -> the index directory (ChunkWriter); returns whether a partial index
    directory was replaced."""
    ids, locations, embeddings, duplicates, rejects = read_shards(shard_dir, paths)
    run = {"fingerprint": fingerprint, "catalogue": [catalogue.file_stamp(p) for p in paths],
           "runner": "beam", "chunk_rows": chunk_rows, "format": store.FORMAT_VERSION}
    partial = out_dir.rstrip("/") + store.PARTIAL_SUFFIX
    restarted = os.path.isdir(partial)
    shutil.rmtree(partial, ignore_errors=True)          # the shards are complete: start over
    writer = store.ChunkWriter(out_dir, run)
    end = catalogue.Position(len(paths), 0, 1)
    for start in range(0, max(len(ids), 1), chunk_rows):
        rows = np.arange(start, min(start + chunk_rows, len(ids)))
        first = start == 0
        writer.write(ids[rows], embeddings(rows) if len(rows) else np.zeros([0, width],
                                                                              np.float32),
                     locations[rows], rejects if first else [], duplicates if first else 0, end)
    meta = {"fingerprint": fingerprint, "fingerprint_kind": model_lib.FINGERPRINT_KIND,
            "model": model_path, "width": width, "catalogue": run["catalogue"]}
    writer.finish(meta, lambda emb, ann_dir: ann_lib.build(emb, ann_dir, ann_kind, ann_params))
    return restarted
