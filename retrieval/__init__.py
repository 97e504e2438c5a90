"""Catalogue retrieval: index a whole catalogue with the export's product tower, recall with
its query tower, rerank with its served score.

  catalogue.py  streams product rows (competition TSV) and rebuilds a row's request
  model.py      the export in a TF1 Session: embed_query, embed_product, rank; fingerprint
  ann.py        approximate nearest neighbours (ScaNN; faiss IVF) and exact top-k
  expansion.py  query expansion: the query moved towards its nearest products' centroid
  store.py      the index directory: resumable chunks, atomic finish, loading
  index.py      `mmrecall index`
  search.py     `mmrecall search`
  served.py     the served retrieval SavedModel (query text -> top-K ids, exact, in-graph)
  beam_embed.py the catalogue embedded by an Apache Beam pipeline (RunInference)

Sits above export (it may import data_prep, estimator and export). See docs/retrieval.md.
"""
