#!/usr/bin/env bash
# The main job: (generate) -> prep -> train_and_evaluate -> export (with the list stage
# fitted on valid) -> rank valid and test -> score.
#
# With no DATA_DIR it generates a small data set in the competition's exact format, so a
# new user sees the whole pipeline work. Every setting comes from an environment variable:
#
#   DATA_DIR      folder with train.tsv, valid.tsv, valid_answer.json [, testB.tsv
#                 [, testB_answer.json]]  (default: generate one into the run directory)
#   RUNS_DIR      where timestamped run directories go             (default: ./runs)
#   RUN_DIR       this run's directory                             (default: RUNS_DIR/<timestamp>)
#   PREP_DIR      reuse an existing `mmrecall prep` output         (default: RUN_DIR/prep)
#   TRAIN_STEPS   training steps                                   (default: 3000)
#   WORKERS       prep worker processes                            (default: nproc)
#   SEED          generator and training seed                      (default: 1)
#   GEN_ARGS      extra `mmrecall generate` flags                  (default: none)
#   TRAIN_ARGS    extra `mmrecall train` flags, e.g. "--set batch_size=32"
#   LIST_STAGE    `mmrecall export --list-stage`: fit, off or a params file (default: fit)
#   CHECKPOINT    `mmrecall export --checkpoint`: latest, best (the best valid NDCG@5
#                 evaluated during training) or a checkpoint prefix  (default: latest)
#
# It prints NDCG@5 of the first stage (the pointwise model) and of the served, list-aware
# ranking: on valid (the list stage is fitted on valid, so that figure is in-sample) and,
# when the test answers exist (a generated set has testB_answer.json), on test lists never
# used for training or fitting. The last line is the served ranking's `NDCG@5 <value>`,
# on test when its answers exist, else on valid.
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
LIST_STAGE=${LIST_STAGE:-fit}
CHECKPOINT=${CHECKPOINT:-latest}
[[ $CHECKPOINT == latest ]] && CHECKPOINT=""
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
TEST_ANSWERS="${TEST_TSV%.tsv}_answer.json"

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

step "export: SavedModel for TF Serving (checkpoint: ${CHECKPOINT:-latest}), list stage: $LIST_STAGE"
EXPORT_DIR="$RUN_DIR/export"
mmrecall export --model-dir "$MODEL_DIR" --data "$PREP_DIR" --export-dir "$EXPORT_DIR" \
  --checkpoint "$CHECKPOINT" --list-stage "$LIST_STAGE"
SAVED_MODEL=$(ls -d "$EXPORT_DIR"/*/ | sort | tail -n 1)

# rank_and_score NAME TSV ANSWERS [rank flags]: RUN_DIR/NAME_submission.csv and, with
# answers, RUN_DIR/NAME_score.txt (the organiser's NDCG@5).
rank_and_score() {
  local name=$1 tsv=$2 answers=$3
  shift 3
  mmrecall rank --model "$SAVED_MODEL" --input "$tsv" --out "$RUN_DIR/${name}_submission.csv" \
    --scores "$RUN_DIR/${name}_scores.tsv" "$@"
  if [[ -n "$answers" ]]; then
    mmrecall score --answers "$answers" --submission "$RUN_DIR/${name}_submission.csv" \
      | tee "$RUN_DIR/${name}_score.txt"
  fi
}
ndcg() {   # ndcg NAME: the NDCG@5 of RUN_DIR/NAME_score.txt
  python -c 'import json, sys
r = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print("%.4f over %d queries" % (r["ndcg@5"], r["queries"]))' "$RUN_DIR/$1_score.txt"
}

step "rank and score valid: served ranking, then first stage only"
rank_and_score valid "$DATA_DIR/valid.tsv" "$DATA_DIR/valid_answer.json"
rank_and_score valid_first_stage "$DATA_DIR/valid.tsv" "$DATA_DIR/valid_answer.json" \
  --first-stage
LAST=valid
if [[ -f "$TEST_TSV" ]]; then
  answers=""
  [[ -f "$TEST_ANSWERS" ]] && answers="$TEST_ANSWERS"
  step "rank $(basename "$TEST_TSV") into the submission file"
  rank_and_score test "$TEST_TSV" "$answers"
  cp "$RUN_DIR/test_submission.csv" "$RUN_DIR/submission.csv"
  if [[ -n "$answers" ]]; then
    step "score $(basename "$TEST_TSV") with its answers: first stage only"
    rank_and_score test_first_stage "$TEST_TSV" "$answers" --first-stage
    LAST=test
  fi
fi

echo
echo "SavedModel:     $SAVED_MODEL"
echo "Submission:     $RUN_DIR/submission.csv"
echo "Log:            $LOG"
echo "TensorBoard:    tensorboard --logdir $MODEL_DIR"
echo "valid NDCG@5 first stage:  $(ndcg valid_first_stage)  (random ranking: ~0.2)"
echo "valid NDCG@5 list-aware:   $(ndcg valid)  (in-sample: the list stage was fitted on valid)"
if [[ $LAST == test ]]; then
  echo "test NDCG@5 first stage:   $(ndcg test_first_stage)"
  echo "test NDCG@5 list-aware:    $(ndcg test)  (served; lists never used for training or fitting)"
fi
python -c 'import json, sys
print("NDCG@5 %.4f" % json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])["ndcg@5"])' \
  "$RUN_DIR/${LAST}_score.txt"
