"""`mmrecall generate`: a generated data set in the KDD Cup 2020 Multimodalities Recall format.

The files are indistinguishable from the competition's by format (shared/KDD_FORMAT.md) and
resemble them in the published statistics; their content is learnable only by a model that
reads the query's words and matches them against the right region of the photo.

The generative story
--------------------
A *product* is a product type (a noun such as "knife", class id 14) and four attribute
values: colour, material, style and audience. Colours, materials and styles come in
sibling groups of look-alikes ("red", "pink", "orange").

A *query* names the product type (usually as its last word, singular or plural; irregular
plurals such as knives, mice, geese, teeth, feet and the audience "children" make
lemmatisation matter) and mentions a random subset of the product's attributes, in varied
word orders, sometimes with filler words ("2020 new", "flagship store") or a leading
"is"/"are". A product is relevant to a query when its type and every mentioned attribute
match.

A *photo* has 1..N detected boxes. The main box carries the product's class label (rarely
mislabelled "others"), is large and central, and its 2048-d feature holds the product's
type, colour, material and style. The other boxes (faces, arms, hair, hands, "others",
other objects, sometimes a second smaller box of the product's class) carry *other*
values of the same attributes, mostly the siblings of the product's values, so that the
mean over the boxes of a red dress photographed beside pink things looks like that of a
pink dress beside red things. Person boxes carry the audience.

Splits: `train.tsv` holds one positive (query, product) pair per row, several products per
query. `valid.tsv` and `testB.tsv` hold candidate lists of ~30 products per query, ~6 of
them answers, the rest hard negatives: mostly the answers' type with exactly one mentioned
colour/material/style changed (usually to a sibling), some of the same type with other
random attributes, some of another type of the same class, a few random. As in the real
data, answers appear in one list only, while negatives of the last kinds are often reused
from a pool shared by all lists of both splits (same product id, same photo).

Every random draw comes from a stream derived from the seed; a product's photo depends
only on (seed, product id, product), so a pooled product renders identically everywhere.

Data regimes
------------
SynthConfig's knobs (flags of `mmrecall generate`; their defaults give the data above):
mention_scale (how many attributes a query states), shown (how often the photo shows the
product's values), binding (a negative's photo shows the query's missing values on another
object), cluster (answers of a list share, or avoid sharing, the values the query leaves
unsaid), noise (region features), boxes_mean (boxes per photo), train_rows, product_types
and paraphrase (vocabulary size and other words for the same concept). Named presets
(`--preset`, config.PRESETS, preset_config()):

  default    nothing changed (the same bytes as no preset)
  easy       noise 0.5, boxes_mean 1.0: cleaner features, fewer boxes
  hard       noise 1.5, boxes_mean 4.0, shown 0.9, binding 0.3, paraphrase 0.3
  binding    binding 0.8: most negatives carry a decoy box with the query's values
  sparse     mention_scale 0.5, train_rows 2000, paraphrase 0.4: vaguer queries, less
             data, rarer words
  cluster    cluster 0.8: answers mostly share the values the query leaves unsaid
  nocluster  cluster -1.0: answers share no unsaid value where they can avoid it

Modules
-------
config   SynthConfig (every setting) and the seeded random streams
world    classes, product types, attribute values; products and relevance
queries  which values a query states and how it words them
plan     which (query, product) rows each file holds
render   photos: boxes, labels, region features
writer   the data files and both answer files, streamed and written atomically
cli      the `mmrecall generate` command line
"""
from data_prep.synth.cli import build_parser, config_from_args, main
from data_prep.synth.config import PRESETS, SynthConfig, preset_config
from data_prep.synth.plan import CandidateList, plan_eval, plan_train
from data_prep.synth.writer import (
    LABELS_FILE, TEST_FILE, TRAIN_FILE, VALID_ANSWER_FILE, VALID_FILE, generate)

__all__ = [
    "CandidateList", "LABELS_FILE", "PRESETS", "SynthConfig", "TEST_FILE", "TRAIN_FILE",
    "VALID_ANSWER_FILE", "VALID_FILE", "build_parser", "config_from_args", "generate", "main",
    "plan_eval", "plan_train", "preset_config",
]
