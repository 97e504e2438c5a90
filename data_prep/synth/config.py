"""The generator's settings: one frozen dataclass, the named presets and the random streams."""
import dataclasses
from typing import Dict, NamedTuple

import numpy as np

from data_prep.synth.world import PRODUCT_TYPES


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """Everything that determines a generated data set (same config, same bytes).

    The fields from `mention_scale` on are the data-regime knobs; their defaults reproduce
    the default data set exactly.
    """
    out_dir: str
    seed: int = 0
    train_rows: int = 6000
    valid_queries: int = 100
    test_queries: int = 100
    candidates: int = 30          # candidates per valid/test query (most lists)
    answers: int = 6              # answers per valid/test query (most lists)
    max_boxes_train: int = 91
    max_boxes_eval: int = 30
    noise: float = 1.0            # scales feature noise, strength jitter and clutter
    pool_reuse: float = 0.6       # P(a same-type/random negative comes from the shared pool)
    batch_rows: int = 256         # rows rendered per numpy batch
    # Scales P(a query states each attribute) (capped at 1); valid/test queries still state
    # at least one of colour, material, style.
    mention_scale: float = 1.0
    shown: float = 1.0            # P(the main box shows each of the product's visual values)
    # P(a valid/test negative's photo has a decoy box: another object showing the query's
    # value of every stated colour/material/style the negative lacks).
    binding: float = 0.0
    # > 0: P(an answer copies each unstated value from the list's common value) (answers of
    # a list, and products of a train query, look alike beyond what the query says);
    # < 0: P(an answer's unstated value avoids the values earlier answers have); 0: random.
    cluster: float = 0.0
    boxes_mean: float = 2.65      # mean boxes per photo beyond the main one
    product_types: int = len(PRODUCT_TYPES)   # nouns in use (fewer: a smaller vocabulary)
    paraphrase: float = 0.0       # P(a query word is written as one of its paraphrases)


class Preset(NamedTuple):
    """A named data regime: a one-line summary and the SynthConfig fields it sets."""
    summary: str
    settings: Dict[str, object]


PRESETS: Dict[str, Preset] = {
    "default": Preset("the defaults (the same bytes as no preset)", {}),
    "easy": Preset("cleaner region features and fewer boxes per photo",
                   dict(noise=0.5, boxes_mean=1.0)),
    "hard": Preset("noisier features, more boxes, photos that miss some values, decoy "
                   "boxes on a third of the negatives, paraphrased queries",
                   dict(noise=1.5, boxes_mean=4.0, shown=0.9, binding=0.3, paraphrase=0.3)),
    "binding": Preset("most negatives show the query's missing values on another object "
                      "(colour of another object), so only the right box tells",
                      dict(binding=0.8)),
    "sparse": Preset("queries state half as many attributes, a third of the train rows, "
                     "many paraphrases (rarer words)",
                     dict(mention_scale=0.5, train_rows=2000, paraphrase=0.4)),
    "cluster": Preset("answers of a list mostly share the values the query leaves unsaid "
                      "(the cluster hypothesis)", dict(cluster=0.8)),
    "nocluster": Preset("answers of a list share no unsaid value where they can avoid it",
                        dict(cluster=-1.0)),
}


def preset_config(preset: str, out_dir: str, **overrides) -> SynthConfig:
    """The SynthConfig of a named preset, with `overrides` (field=value) on top.

    Raises:
      KeyError: an unknown preset name.
      TypeError: an unknown field name.
    """
    return SynthConfig(out_dir=out_dir, **{**PRESETS[preset].settings, **overrides})


# Independent random streams, one per purpose (mixed with the seed).
STREAM_PROTOTYPES, STREAM_TRAIN, STREAM_EVAL = 11, 12, 13


def stream_rng(seed: int, *stream: int) -> np.random.Generator:
    """The generator of one purpose's draws: numpy's default bit generator keyed by both."""
    return np.random.default_rng([seed, *stream])
