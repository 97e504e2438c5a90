"""The export's towers and scorer in one TF1 Session, and the product tower's fingerprint.

The SavedModel is loaded the way the TF Serving model server loads it (as
export.rank.SavedModelScorer does): the TF1 loader into a Session of its own graph, then
`Session.run` of a signature's tensors. One load serves the three signatures retrieval needs:
`embed_product` (indexing), `embed_query` (search) and `rank` (reranking).

Fingerprint of the product tower: sha256 over
  - the NodeDefs (op, inputs, attrs; devices cleared, the process-wide counter dropped from
    control-flow branch function names) of every node the `embed_product` embedding
    depends on, back to the signature's inputs, in name order, and
  - the name, dtype, shape and value bytes of every variable among those nodes.
So it changes when the product tower's weights or its in-graph preprocessing change (box
cap, geometry), and not when only the query tower, the cross-attention or the list stage
change; exporting the same checkpoint twice gives the same fingerprint.
"""
import hashlib
import re
from typing import Dict, List, Sequence

import numpy as np

from export import rank as rank_lib
from export import signatures as sig_lib

FINGERPRINT_KIND = "sha256 of embed_product's subgraph NodeDefs + the variables it reads"
# Feed fields of embed_product, in a fixed order.
PRODUCT_FIELDS = sig_lib.PRODUCT_B64_FIELDS + sig_lib.PRODUCT_INT_FIELDS
_FUNCTION_UID = re.compile(r"_\d+$")


class ModelError(RuntimeError):
    """The export lacks a signature retrieval needs."""


class ExportModel:
    """An export loaded once: product and query embeddings, list scores, fingerprint."""

    def __init__(self, model_dir: str):
        """Args:
          model_dir: a SavedModel directory or its export base (newest version used).
        Raises:
          ModelError: a signature or output is missing.
        """
        try:
            export = rank_lib.load_session_export(
                model_dir, [(sig_lib.EMBED_QUERY, sig_lib.EMBEDDING),
                            (sig_lib.EMBED_PRODUCT, sig_lib.EMBEDDING),
                            (sig_lib.RANK, sig_lib.SCORES),
                            (sig_lib.RANK, sig_lib.FIRST_STAGE_SCORES)])
        except KeyError as e:
            raise ModelError(e.args[0]) from None
        self.path, self.session = export.path, export.session
        self._sigs = export.tensors
        self._fingerprint = None

    def tensor(self, signature: str, output: str):
        """(input tensors by field, output tensor) of a signature's output."""
        return self._sigs[(signature, output)]

    @property
    def width(self) -> int:
        """E, the embeddings' width (static in the export's graph)."""
        return int(self._sigs[(sig_lib.EMBED_QUERY, sig_lib.EMBEDDING)][1].shape[-1])

    def _run(self, key, inputs: Dict[str, np.ndarray]) -> np.ndarray:
        feeds, fetch = self._sigs[key]
        return self.session.run(fetch, {feeds[k]: v for k, v in inputs.items()})

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Query texts [B] -> float32 [B, E] L2-normalised embeddings (embed_query)."""
        queries = np.array([t.encode("utf-8") if isinstance(t, str) else t for t in texts],
                           dtype=object)
        return self._run((sig_lib.EMBED_QUERY, sig_lib.EMBEDDING), {sig_lib.QUERY: queries})

    def embed_products(self, fields: Dict[str, Sequence]) -> np.ndarray:
        """Product request fields {PRODUCT_FIELDS: [B] values} -> float32 [B, E]
        (embed_product)."""
        inputs = {k: np.array(list(fields[k]), dtype=object) for k in sig_lib.PRODUCT_B64_FIELDS}
        inputs.update({k: np.array(list(fields[k]), np.int64) for k in sig_lib.PRODUCT_INT_FIELDS})
        return self._run((sig_lib.EMBED_PRODUCT, sig_lib.EMBEDDING), inputs)

    def score_lists(self, lists: Sequence[Dict[str, Sequence]],
                    first_stage: bool = False) -> List[np.ndarray]:
        """Whole candidate lists -> each list's float32 [C_i] scores (the `rank` signature:
        the list stage's scores, or first_stage_scores, the pair score alone).

        Args:
          lists: per list {PRODUCT_FIELDS + (query,): [C_i] values}, C_i >= 1, one query
            text repeated.
        """
        output = sig_lib.FIRST_STAGE_SCORES if first_stage else sig_lib.SCORES
        scores = self._run((sig_lib.RANK, output), rank_lib.pad_lists(lists))   # [Q, C]
        return [scores[i, :len(l[sig_lib.QUERY])] for i, l in enumerate(lists)]

    @property
    def fingerprint(self) -> str:
        """The product tower's fingerprint (module docstring), hex."""
        if self._fingerprint is None:
            self._fingerprint = product_tower_fingerprint(
                self.session, *self._sigs[(sig_lib.EMBED_PRODUCT, sig_lib.EMBEDDING)])
        return self._fingerprint

    def close(self) -> None:
        """Closes the Session."""
        self.session.close()


def _drop_function_uids(node) -> None:
    """Strips the process-wide counter TensorFlow appends to a control-flow op's branch
    function names (an assertion's `If` names "..._AssertGuard_true_5152"), which depends
    on how many graphs the process built before, not on the graph."""
    for value in node.attr.values():
        funcs = list(value.list.func) if value.HasField("list") else []
        if value.HasField("func"):
            funcs.append(value.func)
        for func in funcs:
            func.name = _FUNCTION_UID.sub("", func.name)


def product_tower_fingerprint(session, feeds: Dict[str, object], output) -> str:
    """sha256 of the subgraph from `feeds` to `output` and of the variables it reads.

    Args:
      session: the Session holding the loaded graph (variables restored).
      feeds: the signature's input tensors (the walk stops there).
      output: the embedding tensor.
    Returns:
      64 hex characters.
    """
    stop = {t.op.name for t in feeds.values()}
    seen, stack, nodes = set(), [output.op], []
    while stack:
        op = stack.pop()
        if op.name in seen:
            continue
        seen.add(op.name)
        nodes.append(op)
        if op.name in stop:
            continue                        # the feed point: what is upstream never runs
        stack.extend(t.op for t in op.inputs)
        stack.extend(op.control_inputs)
    digest = hashlib.sha256()
    handles = {}
    for op in sorted(nodes, key=lambda o: o.name):
        node = op.node_def
        node.ClearField("device")
        _drop_function_uids(node)
        digest.update(node.SerializeToString(deterministic=True))
        if op.type == "ReadVariableOp":
            handles.setdefault(op.inputs[0].op.name, op.outputs[0])
        elif op.type in ("VariableV2", "Variable"):
            handles.setdefault(op.name, op.outputs[0])
    names = sorted(handles)
    values = session.run([handles[n] for n in names]) if names else []
    for name, value in zip(names, values):
        value = np.ascontiguousarray(value)
        digest.update(f"{name}|{value.dtype.str}|{value.shape}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()
