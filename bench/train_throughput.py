"""Training throughput: positives/s of the Config defaults and of the peer's shape, and the
examples/s the input pipeline feeds.

    python bench/train_throughput.py [--data PREP_DIR] [--steps 100] [--warmup 20]
        [--rounds 1] [--shapes default,peer,peer_padded] [--xla] [--set key=value ...]
        [--out bench/results/train_throughput.json]
    python bench/train_throughput.py --profile [--shapes peer] [--trace-steps 3] [--top 12]

Without --data a small prep-shaped directory is written with
mmrecall_testing/model_fixtures.py (up to 10 boxes, queries of 3-4 tokens).

Shapes, measured in the same process, one after the other in each of --rounds rounds
(--set applies to every shape, after the shape's own fields):
  default: the Config defaults.
  peer:    the equal-work shape of issue 15 (PEER_SHAPE: batch 128, K = 5 negatives, width
           256 for the model, pooled and feed-forward widths, one layer per tower and one
           matcher round, every box the prep kept). The peer team's model_fn is not
           available here, so the peer's own figure is not measured; `peer` is ours at its
           shape.
  peer_padded: `peer` with batches in arrival order (batch_by_boxes=false): every batch
           padded to the largest box count among its rows, as a model without box-count
           batching pays.
  --xla adds `<shape>+xla` (Config.xla, XLA auto-clustering; on CPU TensorFlow clusters
  only with TF_XLA_FLAGS=--tf_xla_cpu_global_jit, which this script sets for --xla).
Model rate: tf.estimator training steps/s after `warmup` steps (hook timing), reported as
positives/s (batch_size per step) and scored pairs/s (batch_size * (1 + K)); the median over
rounds, and the ratio of each shape to the first one within each round. Also positives per
CPU second of the process, steadier than wall time when other jobs share the cores. Pipeline: the TRAIN
input_fn of the default shape alone; it must feed at least 5x the fastest model rate.

--profile traces --trace-steps training steps per shape (after the warmup) with
RunOptions FULL_TRACE, one op at a time (--inter-op-threads 1 unless set), and prints
where the op time goes, per part of the step (CATEGORIES:
towers, pair gathers, matcher cross-attention / gated fusion / pooling + MLP, negatives,
losses, optimiser, backward gradient sums), forward and backward together, plus the most
expensive ops. With more inter-op threads op times overlap and inflate each other (the
total then exceeds the step's wall time); shares are of the total op time.
"""
import argparse
import collections
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

if "--xla" in sys.argv:
    # Read once when TensorFlow starts; without it global_jit_level clusters nothing on CPU.
    os.environ["TF_XLA_FLAGS"] = (os.environ.get("TF_XLA_FLAGS", "")
                                  + " --tf_xla_cpu_global_jit").strip()

import tensorflow as tf  # noqa: E402

from data_prep.manifest import PrepDir  # noqa: E402
from estimator import input_fn as input_lib  # noqa: E402
from estimator import train  # noqa: E402
from estimator.config import Config  # noqa: E402
from mmrecall_testing.model_fixtures import write_prep_dir  # noqa: E402
from mmrecall_testing.bench_report import write_report  # noqa: E402

# max_boxes 0: every box the prep kept (10 here), as when the equal-work figure was first
# measured; the default's cap of 8 would make the peer shape lighter than the peer's work.
PEER_SHAPE = {"batch_size": 128, "num_negatives": 5, "hidden_size": 256, "pooled_size": 256,
              "intermediate_size": 256, "text_layers": 1, "box_layers": 1, "cross_layers": 1,
              "max_boxes": 0}
SHAPES = {"default": {}, "peer": PEER_SHAPE,
          "peer_padded": dict(PEER_SHAPE, batch_by_boxes=False)}

# (category, test on the op name without its "gradients/" prefix), first match wins.
CATEGORIES = [
    ("pair gathers", lambda n: "pair_gather" in n or n.startswith("pairs/")),
    ("text tower", lambda n: n.startswith(("text_tower/", "ranker/text_tower/"))),
    ("box tower", lambda n: n.startswith(("box_tower/", "ranker/box_tower/"))),
    ("matcher: cross-attention", lambda n: n.startswith(("matcher/word_to_region",
                                                         "matcher/region_to_word"))),
    ("matcher: gated fusion", lambda n: n.startswith(("matcher/text_fusion",
                                                      "matcher/box_fusion"))),
    ("matcher: pooling + MLP", lambda n: n.startswith("matcher/")),
    ("negatives", lambda n: n.startswith("negatives/")),
    ("losses", lambda n: n.startswith("losses/")),
    ("optimiser", lambda n: n.startswith(("Adam", "clip_by_global_norm", "global_norm",
                                          "weight_decay", "learning_rate"))),
    ("backward: gradient sums", lambda n: n.startswith("AddN")),
    ("input (GetNext)", lambda n: n.startswith("IteratorGetNext")),
    ("XLA clusters", lambda n: n.startswith("cluster_")),
]


def category(node_name):
    """The CATEGORIES entry of an op name (forward and backward alike), else "other"."""
    name = node_name.split("gradients/", 1)[1] if node_name.startswith("gradients") \
        else node_name
    for label, test in CATEGORIES:
        if test(name):
            return label
    return "other"


class _Timer(tf.compat.v1.train.SessionRunHook):
    """Times the training steps after the first `warmup` ones: wall seconds and the
    process's CPU seconds (all threads, input pipeline included)."""

    def __init__(self, warmup):
        self.warmup, self.count, self.start, self.cpu_start = warmup, 0, None, None

    def after_run(self, run_context, run_values):
        self.count += 1
        if self.count == self.warmup:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def end(self, session):
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start
        self.timed_steps = self.count - self.warmup


class _Tracer(tf.compat.v1.train.SessionRunHook):
    """Traces `steps` training steps after `warmup` with FULL_TRACE; sums op time per op."""

    def __init__(self, warmup, steps):
        self.warmup, self.steps, self.count = warmup, steps, 0
        self.op_micros = collections.Counter()        # (name, op type) -> us over traced steps
        self.wall_micros = []

    def before_run(self, run_context):
        if self.warmup <= self.count < self.warmup + self.steps:
            return tf.compat.v1.train.SessionRunArgs(
                None, options=tf.compat.v1.RunOptions(
                    trace_level=tf.compat.v1.RunOptions.FULL_TRACE))
        return None

    def after_run(self, run_context, run_values):
        self.count += 1
        stats = run_values.run_metadata.step_stats
        if not stats.dev_stats:
            return
        starts, ends = [], []
        for dev in stats.dev_stats:
            for node in dev.node_stats:
                op = node.timeline_label.split(" = ")[-1].split("(")[0] if node.timeline_label \
                    else ""
                self.op_micros[(node.node_name, op)] += (node.op_end_rel_micros
                                                         - node.op_start_rel_micros)
                starts.append(node.all_start_micros)
                ends.append(node.all_start_micros + node.all_end_rel_micros)
        self.wall_micros.append(max(ends) - min(starts))


def shape_configs(args):
    """{shape name: Config before resolution}, in measuring order."""
    names = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = sorted(set(names) - set(SHAPES))
    if unknown:
        raise SystemExit(f"unknown shapes {unknown}; known {sorted(SHAPES)}")
    run = {"save_checkpoints_steps": 10 ** 9, "save_summary_steps": 10 ** 9,
           "log_step_count_steps": 10 ** 9}
    configs = {}
    for name in names:
        cfg = Config.from_dict(dict(SHAPES[name], **run)).with_overrides(args.set)
        configs[name] = cfg
        if args.xla:
            configs[name + "+xla"] = Config.from_dict({"xla": True}, cfg)
    return configs


def run_training(cfg, prep, steps, hooks, inter_op_threads=0):
    """Trains a fresh model for `steps` steps with `hooks` (checkpoints in a temp dir);
    inter_op_threads > 0 caps the session's concurrently running ops."""
    cfg = train.resolve_config(Config.from_dict({"train_steps": steps}, cfg), prep)
    est = train.build_estimator(cfg, tempfile.mkdtemp(prefix="mmrecall-tp-model-"), prep)
    if inter_op_threads:
        session_config = tf.compat.v1.ConfigProto()
        session_config.CopyFrom(est.config.session_config)
        session_config.inter_op_parallelism_threads = inter_op_threads
        est = tf.estimator.Estimator(model_fn=est.model_fn,
                                     config=est.config.replace(session_config=session_config))
    est.train(input_lib.input_fn_builder(cfg, prep.split_files("train"),
                                         tf.estimator.ModeKeys.TRAIN, prep),
              max_steps=cfg.train_steps, hooks=hooks)
    return cfg


def measure_model(cfg, prep, steps, warmup, inter_op_threads=0):
    """(training steps per wall second, per CPU second) after `warmup` steps."""
    timer = _Timer(warmup)
    run_training(cfg, prep, steps + warmup, [timer], inter_op_threads)
    return timer.timed_steps / timer.seconds, timer.timed_steps / timer.cpu_seconds


def measure_pipeline(cfg, prep, batches, warmup=5):
    """Examples/s of the TRAIN input_fn alone, over `batches` batches after `warmup`."""
    cfg = train.resolve_config(cfg, prep)
    ds = input_lib.input_fn_builder(cfg, prep.split_files("train"),
                                    tf.estimator.ModeKeys.TRAIN, prep)()
    it = iter(ds)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - start
    return batches * cfg.batch_size / seconds


def profile(cfg, prep, warmup, trace_steps, top, inter_op_threads):
    """Traces `trace_steps` steps; prints the per-category table; returns it as a dict."""
    tracer = _Tracer(warmup, trace_steps)
    run_training(cfg, prep, warmup + trace_steps, [tracer], inter_op_threads)
    n = max(len(tracer.wall_micros), 1)
    per_category = collections.Counter()
    for (name, _), micros in tracer.op_micros.items():
        per_category[category(name)] += micros
    total = sum(per_category.values())
    rows = [{"category": c, "ms_per_step": round(us / n / 1000, 2),
             "share": round(us / total, 3)} for c, us in per_category.most_common()]
    print(f"{'part of the step':28s} {'op ms/step':>10s} {'share':>6s}")
    for row in rows:
        print(f"{row['category']:28s} {row['ms_per_step']:10.1f} {row['share']:6.1%}")
    wall = statistics.median(tracer.wall_micros) / 1000 if tracer.wall_micros else 0.0
    print(f"{'total op time':28s} {total / n / 1000:10.1f}   (traced step wall {wall:.1f} ms)")
    ops = [{"op": name, "type": op, "ms_per_step": round(us / n / 1000, 2)}
           for (name, op), us in tracer.op_micros.most_common(top)]
    for row in ops:
        print(f"  {row['ms_per_step']:7.2f} ms  {row['type'][:22]:22s} {row['op']}")
    return {"categories": rows, "total_op_ms_per_step": round(total / n / 1000, 1),
            "traced_wall_ms_per_step": round(wall, 1), "top_ops": ops}


def main(argv=None):
    """Measures (or profiles) every shape, prints and writes the JSON; 1 when the pipeline
    is too slow."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--shapes", default="default,peer,peer_padded")
    parser.add_argument("--xla", action="store_true")
    parser.add_argument("--pipeline-batches", type=int, default=200)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--trace-steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--inter-op-threads", type=int, default=None,
                        help="session inter-op threads (default: TensorFlow's choice; "
                             "1 with --profile, so that op times do not overlap)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default=os.path.join(HERE, "results", "train_throughput.json"))
    args = parser.parse_args(argv)

    data = args.data or write_prep_dir(tempfile.mkdtemp(prefix="mmrecall-tp-"), num_train=2000,
                                       num_valid_queries=0, max_boxes=10, embedding_dim=64)
    prep = PrepDir(data)
    configs = shape_configs(args)
    inter_op = args.inter_op_threads
    if inter_op is None:
        inter_op = 1 if args.profile else 0
    report = {"data": data, "cpu_count": os.cpu_count(), "peer_shape": PEER_SHAPE,
              "set": args.set, "inter_op_threads": inter_op, "shapes": {}}
    if args.profile:
        for name, cfg in configs.items():
            print(f"\n== {name}: batch {cfg.batch_size}, K {cfg.num_negatives}, "
                  f"width {cfg.hidden_size}, xla {cfg.xla}")
            report["shapes"][name] = profile(cfg, prep, args.warmup, args.trace_steps, args.top,
                                             inter_op)
        print(json.dumps({"written": write_report(args.out, report, indent=2)}))
        return 0

    rates = {name: [] for name in configs}       # positives per wall second, per round
    cpu_rates = {name: [] for name in configs}   # positives per CPU second
    for _ in range(args.rounds):
        for name, cfg in configs.items():
            wall, cpu = measure_model(cfg, prep, args.steps, args.warmup, inter_op)
            rates[name].append(wall * cfg.batch_size)
            cpu_rates[name].append(cpu * cfg.batch_size)
    first = next(iter(configs))
    for name, cfg in configs.items():
        positives = statistics.median(rates[name])
        report["shapes"][name] = {
            "batch_size": cfg.batch_size, "num_negatives": cfg.num_negatives,
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "xla": cfg.xla, "positives_per_s": round(positives, 1),
            "pairs_per_s": round(positives * (1 + cfg.num_negatives), 1),
            "positives_per_cpu_s": round(statistics.median(cpu_rates[name]), 1),
            "positives_per_s_rounds": [round(r, 1) for r in rates[name]],
            f"ratio_to_{first}_rounds": [round(r / f, 3) for r, f in zip(rates[name],
                                                                          rates[first])],
        }
    fastest = max(statistics.median(r) for r in rates.values())
    pipeline_eps = measure_pipeline(configs[first], prep, args.pipeline_batches)
    report.update({
        "pipeline_examples_per_s": round(pipeline_eps, 1),
        "pipeline_ratio_to_fastest_model": round(pipeline_eps / fastest, 2),
        "ok": pipeline_eps >= 5 * fastest,
    })
    print(json.dumps(report, indent=2))
    write_report(args.out, report, indent=2)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
