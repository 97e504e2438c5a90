#!/usr/bin/env bash
# The main job: (generate) -> prep -> train_and_evaluate -> export -> rank valid -> score.
#
# With no DATA_DIR it generates a small data set in the competition's exact format, so a
# new user sees the whole pipeline work. Every setting comes from an environment variable:
#
#   DATA_DIR      folder with train.tsv, valid.tsv, valid_answer.json [, testB.tsv]
#                 (default: generate one into the run directory)
#   RUNS_DIR      where timestamped run directories go             (default: ./runs)
#   RUN_DIR       this run's directory                             (default: RUNS_DIR/<timestamp>)
#   PREP_DIR      reuse an existing `mmrecall prep` output         (default: RUN_DIR/prep)
#   TRAIN_STEPS   training steps                                   (default: 3000)
#   WORKERS       prep worker processes                            (default: nproc)
#   SEED          generator and training seed                      (default: 1)
#   GEN_ARGS      extra `mmrecall generate` flags                  (default: none)
#   TRAIN_ARGS    extra `mmrecall train` flags, e.g. "--set batch_size=32"
#
# Example on the real data:
#   DATA_DIR=/data/kdd2020 TRAIN_STEPS=200000 ./run_train.sh
set -euo pipefail

cd "$(dirname "$0")"
RUNS_DIR=${RUNS_DIR:-runs}
RUN_DIR=${RUN_DIR:-$RUNS_DIR/$(date +%Y%m%d-%H%M%S)}
TRAIN_STEPS=${TRAIN_STEPS:-3000}
WORKERS=${WORKERS:-$(nproc)}
SEED=${SEED:-1}
GEN_ARGS=${GEN_ARGS:-}
TRAIN_ARGS=${TRAIN_ARGS:-}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

mkdir -p "$RUN_DIR"
LOG="$RUN_DIR/run.log"
exec > >(tee -a "$LOG") 2>&1
step() { printf '\n==> [%s] %s\n' "$(date +%H:%M:%S)" "$*"; }

step "run directory: $RUN_DIR"
if [[ -z "${DATA_DIR:-}" ]]; then
  DATA_DIR="$RUN_DIR/data"
  step "no DATA_DIR given: generating a data set in $DATA_DIR"
  # shellcheck disable=SC2086
  mmrecall generate --out "$DATA_DIR" --seed "$SEED" $GEN_ARGS
fi
TEST_TSV="$DATA_DIR/testB.tsv"
[[ -f "$TEST_TSV" ]] || TEST_TSV="$DATA_DIR/testA.tsv"

if [[ -z "${PREP_DIR:-}" ]]; then
  PREP_DIR="$RUN_DIR/prep"
  step "prep: TSV -> TFRecords, vocabulary, word2vec"
  prep_args=(--out "$PREP_DIR" --workers "$WORKERS"
             --train "$DATA_DIR/train.tsv"
             --valid "$DATA_DIR/valid.tsv" --valid-answers "$DATA_DIR/valid_answer.json")
  [[ -f "$TEST_TSV" ]] && prep_args+=(--test "$TEST_TSV")
  mmrecall prep "${prep_args[@]}"
fi

MODEL_DIR="$RUN_DIR/model"
step "train_and_evaluate: $TRAIN_STEPS steps into $MODEL_DIR"
# shellcheck disable=SC2086
mmrecall train --data "$PREP_DIR" --model-dir "$MODEL_DIR" --steps "$TRAIN_STEPS" \
  --set seed="$SEED" $TRAIN_ARGS

step "export: SavedModel for TF Serving"
EXPORT_DIR="$RUN_DIR/export"
mmrecall export --model-dir "$MODEL_DIR" --data "$PREP_DIR" --export-dir "$EXPORT_DIR"
SAVED_MODEL=$(ls -d "$EXPORT_DIR"/*/ | sort | tail -n 1)

step "rank valid with the SavedModel"
mmrecall rank --model "$SAVED_MODEL" --input "$DATA_DIR/valid.tsv" \
  --out "$RUN_DIR/valid_submission.csv" --scores "$RUN_DIR/valid_scores.tsv"
if [[ -f "$TEST_TSV" ]]; then
  step "rank $(basename "$TEST_TSV") into the submission file"
  mmrecall rank --model "$SAVED_MODEL" --input "$TEST_TSV" --out "$RUN_DIR/submission.csv"
fi

step "score valid as the organiser does"
mmrecall score --answers "$DATA_DIR/valid_answer.json" \
  --submission "$RUN_DIR/valid_submission.csv" | tee "$RUN_DIR/valid_score.txt"

echo
echo "SavedModel:     $SAVED_MODEL"
echo "Log:            $LOG"
echo "TensorBoard:    tensorboard --logdir $MODEL_DIR"
python -c 'import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print("valid NDCG@5:   %.4f over %d queries (random ranking: ~0.2)" % (r["ndcg@5"], r["queries"]))' \
  "$RUN_DIR/valid_score.txt"
