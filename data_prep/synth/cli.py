"""`mmrecall generate`: the command line of the generator."""
import argparse
import dataclasses
import os
import sys
import textwrap
import time
from typing import Callable, Optional, Sequence

from data_prep.synth.config import PRESETS, SynthConfig
from data_prep.synth.world import PRODUCT_TYPES
from data_prep.synth.writer import generate


def _number(kind: Callable, low: float, high: float = float("inf")) -> Callable[[str], float]:
    """An argparse `type`: parses `kind` (int or float) and requires low <= value <= high."""
    def parse(text: str):
        """The value of `text`; argparse.ArgumentTypeError when it is not one."""
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}")
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be >= {low}, got {value}" if high == float("inf")
                else f"must be in [{low}, {high}], got {value}")
        return value
    return parse


# (SynthConfig field, argparse type, help); the flag is --field-name-with-dashes.
_FLAGS = (
    ("seed", _number(int, 0), "random seed, 0 <= seed < 2**63"),
    ("train_rows", _number(int, 0), "rows of train.tsv, one positive (query, product) pair each"),
    ("valid_queries", _number(int, 0), "queries (candidate lists) in valid.tsv"),
    ("test_queries", _number(int, 0), "queries (candidate lists) in testB.tsv"),
    ("candidates", _number(int, 2),
     "candidates per valid/test query (most lists; some are shorter)"),
    ("answers", _number(int, 1), "answers per valid/test query (most lists; some have 2..N-1)"),
    ("max_boxes_train", _number(int, 1), "most boxes in a train photo"),
    ("max_boxes_eval", _number(int, 1), "most boxes in a valid/test photo"),
    ("noise", _number(float, 0.0, 10.0),
     "region-feature noise scale (0 = clean prototypes); higher is harder"),
    ("pool_reuse", _number(float, 0.0, 1.0),
     "probability that a same-type or random negative is reused from the pool shared by all "
     "valid/test lists (the real data's 'answers appear in one list only' artefact); "
     "0 disables"),
    ("batch_rows", _number(int, 1), "rows rendered per numpy batch (memory vs. speed)"),
    ("mention_scale", _number(float, 0.0, 3.0),
     "multiplies the probability that a query states each attribute (colour .62, material "
     ".55, style .58, audience .32; capped at 1); lower makes vaguer queries (valid/test "
     "queries still state one of colour, material, style)"),
    ("shown", _number(float, 0.0, 1.0),
     "probability that the product's box shows each of its colour, material and style; "
     "below 1 a photo can miss a value its query states"),
    ("binding", _number(float, 0.0, 1.0),
     "probability that a valid/test negative's photo shows, on another object, the query's "
     "values the negative lacks (the colour of another object)"),
    ("cluster", _number(float, -1.0, 1.0),
     "> 0: answers of a list (and products of a train query) share each value the query "
     "leaves unsaid with this probability (the cluster hypothesis); < 0: they avoid sharing "
     "them; 0: independent"),
    ("boxes_mean", _number(float, 0.0, 30.0), "mean boxes per photo beyond the product's own"),
    ("product_types", _number(int, 1, len(PRODUCT_TYPES)),
     "product types (nouns) in use; fewer make a smaller vocabulary"),
    ("paraphrase", _number(float, 0.0, 1.0),
     "probability that a query's noun and each colour/material/style are written with "
     "another word (couch for sofa, scarlet for red): more distinct words per concept"),
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter,
                     argparse.RawDescriptionHelpFormatter):
    """Flag defaults in the help, and the description's line breaks kept."""


def _description() -> str:
    width = max(map(len, PRESETS))
    indent = " " * (width + 4)
    presets = "\n".join(
        textwrap.fill(f"{name.ljust(width)}  {p.summary}", 88, initial_indent="  ",
                      subsequent_indent=indent)
        + "".join(f"\n{indent}--{k.replace('_', '-')} {v}" for k, v in p.settings.items())
        for name, p in PRESETS.items())
    return ("Write a generated data set in the exact format of the KDD Cup 2020\n"
            "Multimodalities Recall files: train.tsv, valid.tsv, valid_answer.json, testB.tsv\n"
            "and multimodal_labels.txt, plus testB_answer.json (the organiser kept the test\n"
            "answers; here they measure queries never used for fitting). Deterministic for a\n"
            "seed and flags. The defaults make a small set for a quick end-to-end run.\n\n"
            "--preset NAME picks a data regime; flags given as well override its values.\n"
            f"Presets:\n{presets}")


def build_parser() -> argparse.ArgumentParser:
    """The `mmrecall generate` parser; its defaults are SynthConfig's (no preset)."""
    defaults = SynthConfig(out_dir="")
    parser = argparse.ArgumentParser(prog="mmrecall generate", description=_description(),
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory (created if missing; files are replaced)")
    parser.add_argument("--preset", choices=tuple(PRESETS), default="default",
                        help="a named data regime (listed above)")
    for field, kind, help_text in _FLAGS:
        parser.add_argument("--" + field.replace("_", "-"), type=kind,
                            default=getattr(defaults, field), help=help_text)
    return parser


def config_from_args(argv: Sequence[str]) -> SynthConfig:
    """Parses command-line arguments into a SynthConfig (argparse errors exit with 2).

    The preset's values replace SynthConfig's defaults; flags given replace both.
    """
    argv = list(argv)
    parser = build_parser()
    first = argparse.ArgumentParser(prog=parser.prog, add_help=False)
    first.add_argument("--preset", choices=tuple(PRESETS), default="default")
    preset = first.parse_known_args(argv)[0].preset
    parser.set_defaults(**PRESETS[preset].settings)
    args = parser.parse_args(argv)
    if args.seed >= 2 ** 63:
        parser.error(f"--seed must be < 2**63, got {args.seed}")
    if args.candidates <= args.answers:
        parser.error(f"--candidates ({args.candidates}) must exceed --answers ({args.answers})")
    fields = [f.name for f in dataclasses.fields(SynthConfig) if f.name != "out_dir"]
    return SynthConfig(out_dir=args.out, **{name: getattr(args, name) for name in fields})


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`mmrecall generate`: writes the data set; prints rows, MB and rate to stderr."""
    cfg = config_from_args(sys.argv[1:] if argv is None else argv)
    start = time.perf_counter()
    counts = generate(cfg)
    seconds = time.perf_counter() - start
    rows = sum(counts.values())
    size = sum(os.path.getsize(os.path.join(cfg.out_dir, name)) for name in counts)
    print(f"mmrecall generate: {', '.join(f'{n} {c} rows' for n, c in counts.items())} in "
          f"{seconds:.1f}s ({rows / max(seconds, 1e-9):.0f} rows/s, "
          f"{size / 1e6 / max(seconds, 1e-9):.0f} MB/s) -> {cfg.out_dir}", file=sys.stderr)
    return 0
