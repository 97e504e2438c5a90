"""The one configuration object of the ranker: model, sampler, losses, optimiser, run.

`Config` is a flat dataclass so that it round-trips through JSON (`config.json` beside the
checkpoints says how a model directory was trained) and every field can be overridden from
the command line with `--set key=value` (values parsed as JSON, falling back to a string).

Precedence in `mmrecall train`: defaults < an existing `MODEL_DIR/config.json` (resume) <
`--config file.json` < `--set key=value`.

GPU switches:
  mixed_precision: every layer gets the Keras "mixed_float16" policy (float16 compute,
    float32 variables, softmaxes and losses in float32) and the optimiser is wrapped in
    dynamic loss scaling (tf.compat.v1 MixedPrecisionLossScaleOptimizer). Variable names
    and checkpoints are unchanged, so a model trained with it restores without it.
  xla: XLA auto-clustering for the whole session (RunConfig session_config,
    global_jit_level ON_1). The model has no string ops or host round-trips, and the
    input_fn (strings, table lookups) runs in tf.data outside the clustered graph.

Dimension legend: B batch, T query tokens, N boxes, W word2vec width, D model width,
E pooled embedding width, K negatives per positive.
"""
import dataclasses
import json
import os
from typing import Any, Dict, Iterable, List, Optional

from data_prep import shards
from estimator import losses, negatives

CONFIG_FILE = "config.json"


@dataclasses.dataclass
class Config:
    # --- inputs -------------------------------------------------------------------------
    data_dir: str = ""                 # a `mmrecall prep` output directory
    max_query_tokens: int = 16         # T cap: tokens beyond are dropped
    # N cap, the largest boxes by area (never above the prep's own cap; 0 = the prep's cap,
    # see estimator.train.resolve_config). 8 by measurement (bench/quality.py): as good as
    # every box on seven data regimes, and training runs about 1.6x as fast.
    max_boxes: int = 8
    batch_size: int = 128              # training positives per batch
    eval_queries_per_batch: int = 4    # EVAL/PREDICT batches hold whole queries only
    shuffle_buffer: int = 4096
    # >1: training batches are made of runs of this many rows whose queries share the last
    # lemma (the product type), so in-batch negatives include same-type near misses.
    train_group_size: int = 8
    # Rows are regrouped within consecutive windows of this many (rounded up to a multiple
    # of batch_size): a row waits at most one window for same-type partners.
    group_window: int = 2048
    # Each window's rows are batched by kept box count (estimator.input_fn.batch_by_boxes),
    # runs of train_group_size kept, the batches then shuffled: a batch is padded to its own
    # largest count, so less of every step is spent on padded boxes (same quality,
    # bench/quality.py). Its windows hold at most one pass over the worker's rows.
    batch_by_boxes: bool = True
    num_parallel_reads: int = 4        # files read concurrently (interleave cycle length)
    num_parallel_calls: int = -1       # parse parallelism; -1 = tf.data.AUTOTUNE
    prefetch_batches: int = -1         # -1 = tf.data.AUTOTUNE

    # --- model ----------------------------------------------------------------------------
    # Widths 128/128/256 beat 64/64/128 on all seven bench/quality.py regimes over 3 seeds
    # (+0.013 to +0.058 NDCG@5) for about 1.8x the training time.
    hidden_size: int = 128             # D, transformer width of both towers
    pooled_size: int = 128             # E, pooled (retrieval) embedding width
    num_heads: int = 4
    intermediate_size: int = 256       # feed-forward width inside transformer blocks
    text_layers: int = 1
    box_layers: int = 1
    cross_layers: int = 1              # CAMP cross-attention + gated fusion rounds
    box_hidden_size: int = 256         # hidden width of the 2048-d region-feature DNN
    geometry_hidden_size: int = 32     # hidden width of the geometry MLP
    matcher_hidden_size: int = 64      # hidden width of the final scoring MLP
    # One rate for every dropout layer (tower inputs and region features, attention
    # probabilities, feed-forward outputs, matcher MLP). bench/quality.py: 0.05 beats 0.1 by
    # about 0.04 NDCG@5 on 6,000 train rows and ties it on 2,000; 0 is best on 6,000 rows
    # but loses on 2,000.
    dropout: float = 0.05
    # How a tower turns its states [B, L, D] into the pooled embedding before the pooled
    # projection: "attention" (learned attention weights) or "mean" (masked mean).
    pooling: str = "attention"
    # Input of the region-feature DNN: "log1p" (log1p of the non-negative features, which
    # tames their long tail) or "raw" (the features as given).
    region_features: str = "log1p"
    # W; 0 = the prep's word2vec width (filled by estimator.train.resolve_config)
    word_embedding_size: int = 0
    trainable_embeddings: bool = True  # False freezes the word2vec-initialised embedding

    # --- matching score -------------------------------------------------------------------
    # "cross": cross-attention logit; "tower": cosine/temperature of pooled embeddings;
    # "sum": cross + tower_score_weight * tower. With "tower" and no loss on the cross logits
    # (losses.CROSS_LOSSES) the model is towers only: no matcher variables, no pairs (uses_matcher).
    # The default "tower" keeps the matcher as a training signal for the towers (its loss and
    # hard negatives, cross_to_tower_gradient) and serves the towers, which rank better than
    # the cross logit or the sum on every regime of bench/quality.py; the export refits the
    # weight on the valid lists (export.list_fit.fit_lists).
    serving_score: str = "tower"
    tower_score_weight: float = 1.0

    # --- negatives and losses ---------------------------------------------------------------
    sampler: str = "hard"              # a key of estimator.negatives.SAMPLERS
    num_negatives: int = 4             # K in-batch negatives per positive
    # Keys of losses.LOSSES: "log_loss" (binary, on the cross logits), "softmax" (the
    # towers' in-batch softmax), "cross_softmax" (listwise: each positive's cross logit
    # against its negatives'), "focal" (binary focal loss on the cross logits), "instance"
    # (dual-path instance loss: both towers classify the product's own class).
    loss_weights: Dict[str, float] = dataclasses.field(
        default_factory=lambda: {"log_loss": 1.0, "softmax": 1.0})
    temperature: float = 0.05          # in-batch softmax temperature (cosine logits / T)
    focal_gamma: float = 2.0           # focusing exponent of the "focal" loss (0 = log_loss)
    # The "instance" loss (dual-path, every product its own class): C hashed product
    # classes (product_id mod C) and the prototypes sampled per step beside the batch's.
    instance_classes: int = 65536
    instance_sampled: int = 2048
    # Scale of the gradient that flows from the matcher (cross logits) back into the tower
    # states: 1 = fully joint, 0 = towers trained by the tower losses only and the matcher
    # learns on top of them (forward pass unchanged).
    cross_to_tower_gradient: float = 0.2

    # --- optimiser ----------------------------------------------------------------------------
    optimizer: str = "adamw"           # "adamw" or "adam"
    learning_rate: float = 1e-3        # peak, reached after warmup_steps
    warmup_steps: int = 100
    decay: str = "cosine"              # "cosine", "linear" or "constant" after warmup
    min_learning_rate_ratio: float = 0.05
    weight_decay: float = 0.01         # decoupled (AdamW); biases and LayerNorm excluded
    clip_norm: float = 1.0             # global-norm clipping; 0 disables

    # --- run ------------------------------------------------------------------------------
    train_steps: int = 2000            # total steps (resume continues up to this count)
    eval_steps: int = 0                # 0 = the whole valid split
    eval_throttle_secs: int = 60
    seed: int = 42                     # shuffling, initial weights, dropout, negatives
    # True: the training input keeps one order (no out-of-order parallel reads or parses),
    # so one seed gives one run on a given machine; costs input throughput on many cores.
    deterministic: bool = False
    save_checkpoints_steps: int = 500
    keep_checkpoint_max: int = 3
    save_summary_steps: int = 50
    log_step_count_steps: int = 50
    mixed_precision: bool = False      # Keras "mixed_float16" policy + dynamic loss scaling
    xla: bool = False                  # XLA auto-clustering (global_jit_level ON_1)
    # In-machine data parallelism: "" = none; "mirrored" = tf.distribute.MirroredStrategy
    # as RunConfig(train_distribute=..., eval_distribute=...). Under it (TF 2.15 Estimator,
    # make_input_fn_iterator + MultiDeviceIterator) each replica takes its OWN whole batch
    # from the input_fn: batch_size (and eval_queries_per_batch) are PER REPLICA, a step
    # consumes batch_size * replicas rows, and in-batch negatives stay within a replica's
    # batch. Gradients are averaged over replicas (the v1 optimiser scales the loss by
    # 1/replicas) and clipped on the global norm of that mean (as on one device); training
    # summaries come from replica 0's batch, the logged loss is the replicas' mean (the
    # CPU-only device lists use ReductionToOneDevice). EVAL: each replica scores whole eval
    # batches, the tf.compat.v1 metrics (NDCG@5, AUC, means) sum their counters over
    # replicas; the last < replicas batches of the valid split may be left out (the
    # iterator stops when one device runs dry), so use eval_steps=0 with care when
    # comparing runs with different replica counts. Variable names and checkpoints are the
    # same as without the strategy (an export restores either).
    distribute: str = ""
    # Devices of the strategy, e.g. ["/gpu:0", "/gpu:1"]; empty = all GPUs (or the CPU).
    distribute_devices: List[str] = dataclasses.field(default_factory=list)

    # ------------------------------------------------------------------------------------
    @property
    def uses_matcher(self) -> bool:
        """False for a towers-only model: the tower score is served and no weighted loss
        reads the cross logits, so the CAMP matcher would be neither trained nor used."""
        cross_losses = {n for n, w in self.loss_weights.items() if w > 0} & losses.CROSS_LOSSES
        return self.serving_score != "tower" or bool(cross_losses)

    def to_json(self) -> str:
        """The config as indented JSON with sorted keys (what config.json holds)."""
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: Dict[str, Any], base: Optional["Config"] = None) -> "Config":
        """A config from `base` (or the defaults) with `values` applied; unknown keys raise."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known: {sorted(names)}")
        merged = dataclasses.asdict(base or cls())
        merged.update(values)
        cfg = cls(**merged)
        cfg.validate()
        return cfg

    @classmethod
    def from_json(cls, text: str, base: Optional["Config"] = None) -> "Config":
        """from_dict of a JSON object."""
        return cls.from_dict(json.loads(text), base)

    def save(self, model_dir: str) -> str:
        """Writes `config.json` into `model_dir` (atomically) and returns its path.

        Every task of a cluster saves into the shared model_dir at start; shards.write_atomic
        gives each its own temporary name, so the last rename wins and none finds its file
        gone."""
        os.makedirs(model_dir, exist_ok=True)
        path = os.path.join(model_dir, CONFIG_FILE)
        shards.write_atomic(path, (self.to_json() + "\n").encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: str, base: Optional["Config"] = None) -> "Config":
        """Reads a JSON file: a config file or a model directory holding `config.json`."""
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_FILE)
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read(), base)

    def with_overrides(self, assignments: Iterable[str]) -> "Config":
        """Applies `key=value` strings (parse_assignments); unknown keys raise."""
        return Config.from_dict(parse_assignments(assignments), self)

    def validate(self) -> None:
        """Raises ValueError on inconsistent settings (called by every constructor path)."""
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by "
                             f"num_heads {self.num_heads}")
        if self.serving_score not in ("cross", "tower", "sum"):
            raise ValueError(f"serving_score must be cross, tower or sum: {self.serving_score!r}")
        if self.sampler not in negatives.SAMPLERS:
            raise ValueError(f"unknown sampler {self.sampler!r}; "
                             f"known {sorted(negatives.SAMPLERS)}")
        unknown = set(self.loss_weights) - set(losses.LOSSES)
        if unknown:
            raise ValueError(f"unknown losses {sorted(unknown)}; known {sorted(losses.LOSSES)}")
        if not any(w > 0 for w in self.loss_weights.values()):
            raise ValueError("at least one loss weight must be > 0")
        if self.pooling not in ("attention", "mean"):
            raise ValueError(f"pooling must be attention or mean: {self.pooling!r}")
        if self.region_features not in ("log1p", "raw"):
            raise ValueError(f"region_features must be log1p or raw: {self.region_features!r}")
        if self.focal_gamma < 0:
            raise ValueError("focal_gamma must be >= 0")
        if self.instance_classes < 2 or self.instance_sampled < 1:
            raise ValueError("need instance_classes >= 2 and instance_sampled >= 1")
        if self.optimizer not in ("adam", "adamw"):
            raise ValueError(f"optimizer must be adam or adamw: {self.optimizer!r}")
        if self.decay not in ("cosine", "linear", "constant"):
            raise ValueError(f"decay must be cosine, linear or constant: {self.decay!r}")
        if self.num_negatives < 0 or self.batch_size < 2 or self.max_query_tokens < 1:
            raise ValueError("need num_negatives >= 0, batch_size >= 2, max_query_tokens >= 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.train_group_size > 1 and self.group_window < self.train_group_size:
            raise ValueError(f"group_window ({self.group_window}) must be >= "
                             f"train_group_size ({self.train_group_size})")
        if self.distribute not in ("", "mirrored"):
            raise ValueError(f"distribute must be '' or mirrored: {self.distribute!r}")
        if (not isinstance(self.distribute_devices, (list, tuple))
                or not all(isinstance(d, str) and d for d in self.distribute_devices)):
            raise ValueError("distribute_devices must be a list of device strings: "
                             f"{self.distribute_devices!r}")
        if self.distribute_devices and not self.distribute:
            raise ValueError("distribute_devices needs distribute=mirrored")


def parse_assignments(assignments: Iterable[str]) -> Dict[str, Any]:
    """{key: value} of `key=value` strings; values are JSON (`lr=3e-4`,
    `loss_weights={"softmax":1}`) or, when not valid JSON, plain strings (`sampler=hard`).

    Raises:
      ValueError: an item without "=".
    """
    values = {}
    for item in assignments:
        if "=" not in item:
            raise ValueError(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        values[key.strip()] = value
    return values
