"""Small generated data, prep output and an initialised checkpoint for the export tests.

A checkpoint with randomly initialised weights is written the way the Estimator would
restore it (the Ranker's variables under "ranker/" plus global_step), so the export, rank
and benchmark code can be exercised in seconds, without training.
"""
import os

import numpy as np
import tensorflow as tf

from data_prep import prep as prep_lib
from data_prep import schema, synth
from data_prep.manifest import PrepDir
from estimator import network
from estimator import input_fn as input_lib
from estimator import train as train_lib
from estimator.config import Config
from export import list_fit, saved_model

PREP_MAX_BOXES = 6
MODEL_MAX_BOXES = 4   # below the prep cap, to exercise the input_fn's own cap


def generate(out_dir: str, seed: int = 5, train_rows: int = 160, valid_queries: int = 5,
             test_queries: int = 2, candidates: int = 9) -> str:
    """Writes a small generated data set (competition format) and returns its directory."""
    synth.generate(synth.SynthConfig(
        out_dir=out_dir, seed=seed, train_rows=train_rows, valid_queries=valid_queries,
        test_queries=test_queries, candidates=candidates, max_boxes_train=12,
        max_boxes_eval=10))
    return out_dir


def prep(gen_dir: str, out_dir: str, max_boxes: int = PREP_MAX_BOXES) -> str:
    """Runs `mmrecall prep` in-process on a generated set; returns the prep directory."""
    status = prep_lib.main([
        "--out", out_dir, "--train", os.path.join(gen_dir, "train.tsv"),
        "--valid", os.path.join(gen_dir, "valid.tsv"),
        "--valid-answers", os.path.join(gen_dir, "valid_answer.json"),
        "--test", os.path.join(gen_dir, "testB.tsv"),
        "--max-boxes", str(max_boxes), "--embedding-dim", "8", "--w2v-epochs", "1",
        "--no-progress"])
    assert status == 0, "prep failed"
    return out_dir


def tiny_config(prep_dir: PrepDir, **overrides) -> Config:
    """A small Config resolved against the prep directory (as `mmrecall train` does)."""
    values = dict(hidden_size=16, pooled_size=8, num_heads=2, intermediate_size=16,
                  box_hidden_size=16, geometry_hidden_size=8, matcher_hidden_size=8,
                  max_query_tokens=5, max_boxes=MODEL_MAX_BOXES, dropout=0.0,
                  eval_queries_per_batch=2, batch_size=8,
                  # The score tests' absolute tolerances were set at this scale: scores
                  # are cosines / temperature, so float32 error grows with 1 / temperature.
                  temperature=0.1)
    values.update(overrides)
    return train_lib.resolve_config(Config.from_dict(values), prep_dir)


def random_checkpoint(model_dir: str, prep_dir: PrepDir, seed: int = 0, **overrides) -> str:
    """Saves config.json of tiny_config and a randomly initialised checkpoint; returns the
    checkpoint prefix."""
    return write_random_checkpoint(tiny_config(prep_dir, **overrides), model_dir,
                                   len(prep_dir.vocab_tokens()), seed)


def tiny_export(root: str, gen_dir: str = None, **overrides):
    """A servable export of random weights, built under `root` in seconds.

    Generates a small set into root/gen (unless `gen_dir` is given), preps it into
    root/prep, writes a random checkpoint of tiny_config(**overrides) into root/model and
    exports it without a list stage into root/export.

    Returns:
      (the generated data directory, the PrepDir, the SavedModel version directory).
    """
    gen = gen_dir or generate(os.path.join(root, "gen"))
    prep_dir = PrepDir(prep(gen, os.path.join(root, "prep")))
    random_checkpoint(os.path.join(root, "model"), prep_dir, **overrides)
    path = saved_model.export_saved_model(os.path.join(root, "model"), prep_dir,
                                          os.path.join(root, "export"),
                                          list_stage=list_fit.OFF)
    return gen, prep_dir, path


# What indexing a catalogue without one valid row must raise (retrieval.store.StoreError).
EMPTY_CATALOGUE_ERROR = r"^empty catalogue: no valid product row \(1 rejected\)"


def rejects_only_catalogue(path: str) -> str:
    """Writes a product TSV whose only row is malformed (3 columns); returns its path."""
    with open(path, "w", encoding="utf-8") as f:
        f.write("\t".join(schema.TSV_COLUMNS) + "\n1\t2\t3\n")
    return path


def write_random_checkpoint(cfg: Config, model_dir: str, vocab_size: int, seed: int = 0) -> str:
    """Saves `cfg` (resolved) as config.json and a randomly initialised Ranker of it as the
    checkpoint at global step 1, as the Estimator names its variables; returns the prefix."""
    cfg.save(model_dir)
    with tf.Graph().as_default():
        tf.compat.v1.set_random_seed(seed)
        ranker = network.build_ranker(cfg, vocab_size)
        step = tf.compat.v1.train.get_or_create_global_step()
        saver = tf.compat.v1.train.Saver(dict(ranker.variable_map(),
                                              **{"global_step": step}))
        with tf.compat.v1.Session() as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            return saver.save(sess, os.path.join(model_dir, "model.ckpt"), global_step=1)


def estimator_predictions(model_dir: str, prep_dir: PrepDir, split: str = "valid"):
    """{(query_id, product_id): prediction dict} from the Estimator's own predict path."""
    cfg = Config.load(model_dir)
    estimator = train_lib.build_estimator(cfg, model_dir, prep_dir, with_embeddings=False)
    input_fn = input_lib.input_fn_builder(cfg, prep_dir.split_files(split),
                                          tf.estimator.ModeKeys.PREDICT, prep_dir)
    return {(int(p["query_id"]), int(p["product_id"])): p
            for p in estimator.predict(input_fn, yield_single_examples=True)}


def tsv_rows(path: str):
    """[(values dict of the TSV columns as strings)] of a competition TSV."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        assert tuple(header) == schema.TSV_COLUMNS
        return [dict(zip(header, line.rstrip("\n").split("\t"))) for line in f if line.strip()]


def request(rows, fields=("query", "boxes", "features", "class_labels", "num_boxes",
                          "image_h", "image_w")):
    """serving_default inputs (numpy) for TSV rows: string [P] or int64 [P] per field."""
    out = {}
    for f in fields:
        if f in ("num_boxes", "image_h", "image_w"):
            out[f] = np.array([int(r[f]) for r in rows], np.int64)
        else:
            out[f] = np.array([r[f].encode("utf-8") for r in rows], dtype=object)
    return out
