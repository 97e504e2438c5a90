"""Names of the model's outputs: the Estimator's prediction keys, `Ranker.score_pairs`'
result keys, and the serving signatures' output keys that carry the same values.

Defined once here; the model_fn, the network, the export and the rank tool import them.
"""
SCORE = "score"                          # float32 [B], the configured serving score
CROSS_LOGIT = "cross_logit"              # float32 [B], the CAMP matcher's logit
TOWER_SCORE = "tower_score"              # float32 [B], cosine of pooled embeddings / temperature
QUERY_EMBEDDING = "query_embedding"      # float32 [B, E], L2-normalised pooled query
PRODUCT_EMBEDDING = "product_embedding"  # float32 [B, E], L2-normalised pooled product
