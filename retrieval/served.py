"""The served retrieval SavedModel: query text in, top-K product ids and scores out.

Built from the export itself: its MetaGraph is loaded into a new graph (TF1 loader, as the
model server does; variables restored), the catalogue's embeddings and ids become two more
variables (initialised from the index, so the GraphDef stays small: a 1M x 64 constant would
be 256 MB of graph proto), and a `retrieve` signature is added on top of `embed_query`'s
tensors:

  retrieve   query string [B] -> product_ids int64 [B, K], scores float32 [B, K]
             scores = expanded query [B, E] x catalogue embeddings [P, E]^T, exact top K;
             the query expansion (retrieval/expansion.py: q^ + weight * centroid of the
             query's m nearest products) runs in the graph too, as `mmrecall search` does
             it; weight 0 retrieves by the query embedding itself

Every signature of the export is kept (serving_default, rank, embed_*, ...), so one model
retrieves and reranks. The result is saved with the export's variables plus the two new
ones and the export's table initialiser as main op: stock ops only, so the TF Serving model
server (and a process importing only tensorflow + tensorflow_text) loads it as is.
assets.extra/retrieval.json records the index's fingerprint, size and K; the export's
warm-up requests are copied.

Exact in-graph search costs P x E multiply-adds per query (64M at 1M products): fine up to a
few million products on CPU; beyond, or below ~1 ms per query, the ANN index (`mmrecall
search`) takes over (docs/retrieval.md).
"""
import json
import os
import shutil
import time
from typing import Optional

import numpy as np

from export import rank as rank_lib
from export import signatures as sig_lib
from retrieval import expansion as expansion_lib
from retrieval import model as model_lib
from retrieval import store

RETRIEVE = "retrieve"
PRODUCT_IDS = "product_ids"
SCORES = "scores"
METADATA_FILE = "retrieval.json"
_MAIN_OP_KEY = "saved_model_main_op"


def export_served_retrieval(index_dir: str, model_dir: str, export_base: str, k: int = 100,
                            version: Optional[int] = None,
                            expansion: expansion_lib.Expansion = expansion_lib.Expansion()
                            ) -> str:
    """Writes export_base/<version>/: the export plus the `retrieve` signature over the index.

    Args:
      index_dir: a finished index built by model_dir's product tower.
      model_dir: the export (directory or export base).
      export_base: parent of the versioned SavedModel directory.
      k: products returned per query (capped at the catalogue size).
      version: the version directory's number (default: seconds since the epoch).
      expansion: the query expansion run in the graph (expansion_lib.OFF: none).
    Returns:
      The SavedModel directory.
    Raises:
      store.StoreError: index and model do not match.
    """
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  registers NormalizeUTF8 used by the graph

    expansion_lib.checked(expansion)
    index = store.Index(index_dir)
    model_path = rank_lib.resolve_model_dir(model_dir)
    version = version or int(time.time())
    final = os.path.join(export_base, str(version))
    tmp = os.path.join(export_base, f".tmp-{version}")
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(export_base, exist_ok=True)
    graph = tf.Graph()
    with graph.as_default(), tf.compat.v1.Session(graph=graph) as sess:
        meta = tf.compat.v1.saved_model.load(sess, [tf.saved_model.SERVING], model_path)
        sig = meta.signature_def[sig_lib.EMBED_QUERY]
        query = graph.get_tensor_by_name(sig.inputs[sig_lib.QUERY].name)              # [B]
        embedding = graph.get_tensor_by_name(sig.outputs[sig_lib.EMBEDDING].name)     # [B, E]
        feeds = {k_: graph.get_tensor_by_name(v.name) for k_, v in
                 meta.signature_def[sig_lib.EMBED_PRODUCT].inputs.items()}
        p_out = graph.get_tensor_by_name(
            meta.signature_def[sig_lib.EMBED_PRODUCT].outputs[sig_lib.EMBEDDING].name)
        index.check_model(model_lib.product_tower_fingerprint(sess, feeds, p_out),
                          int(embedding.shape[-1]), model_path)
        main_ops = graph.get_collection(_MAIN_OP_KEY)
        graph.clear_collection(_MAIN_OP_KEY)   # the builder adds it back: exactly one
        with tf.name_scope(RETRIEVE):
            emb_init = tf.compat.v1.placeholder(tf.float32, [len(index), index.width])
            ids_init = tf.compat.v1.placeholder(tf.int64, [len(index)])
            catalogue = tf.compat.v1.Variable(emb_init, trainable=False, use_resource=True,
                                              name="catalogue_embeddings")          # [P, E]
            catalogue_ids = tf.compat.v1.Variable(ids_init, trainable=False, use_resource=True,
                                                  name="catalogue_ids")             # [P]
            expanded = expansion_lib.expand_in_graph(embedding, catalogue, expansion)
            scores = tf.matmul(expanded, catalogue, transpose_b=True)               # [B, P]
            top = tf.math.top_k(scores, k=min(k, len(index)), sorted=True)          # [B, K]
            out_ids = tf.gather(catalogue_ids, top.indices, name=PRODUCT_IDS)      # [B, K]
            out_scores = tf.identity(top.values, name=SCORES)                      # [B, K]
        sess.run([catalogue.initializer, catalogue_ids.initializer],
                 {emb_init: np.asarray(index.embeddings), ids_init: index.ids})
        info = tf.compat.v1.saved_model.utils.build_tensor_info
        signatures = dict(meta.signature_def)
        signatures[RETRIEVE] = tf.compat.v1.saved_model.signature_def_utils.build_signature_def(
            inputs={sig_lib.QUERY: info(query)},
            outputs={PRODUCT_IDS: info(out_ids), SCORES: info(out_scores)},
            method_name=tf.saved_model.PREDICT_METHOD_NAME)
        saver = tf.compat.v1.train.Saver(
            var_list=graph.get_collection(tf.compat.v1.GraphKeys.GLOBAL_VARIABLES),
            sharded=True)
        builder = tf.compat.v1.saved_model.Builder(tmp)
        builder.add_meta_graph_and_variables(
            sess, [tf.saved_model.SERVING], signature_def_map=signatures,
            main_op=main_ops[0] if main_ops else None, saver=saver,
            strip_default_attrs=True, clear_devices=True)
        builder.save()
    extra = os.path.join(tmp, "assets.extra")
    os.makedirs(extra, exist_ok=True)
    source_extra = os.path.join(model_path, "assets.extra")
    if os.path.isdir(source_extra):
        for name in os.listdir(source_extra):
            if name.startswith("tf_serving_warmup"):
                shutil.copy(os.path.join(source_extra, name), extra)
    with open(os.path.join(extra, METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump({"index": os.path.abspath(index_dir), "model": model_path,
                   "fingerprint": index.fingerprint, "count": len(index),
                   "width": index.width, "k": min(k, len(index)),
                   "expansion": expansion.to_dict(),
                   "signature": RETRIEVE}, f, indent=1, sort_keys=True)
    os.replace(tmp, final)
    return final
