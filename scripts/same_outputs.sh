#!/usr/bin/env bash
# Same outputs before and after a change: train tiny runs once (with the code of the first call), then score the same
# checkpoints with any code and compare every output (scripts/compare_outputs.py).
#   git worktree add ../before <commit>
#   WORK=/tmp/same CTICH_DIR=... CQ500_DIR=... PY=$PWD/.venv/bin/python bash scripts/same_outputs.sh ../before /tmp/same/before
#   WORK=/tmp/same CTICH_DIR=... CQ500_DIR=... PY=$PWD/.venv/bin/python bash scripts/same_outputs.sh $PWD /tmp/same/after
#   python scripts/compare_outputs.py /tmp/same/before /tmp/same/after
set -euo pipefail
CODE=$1; OUT=$2
PY=${PY:-python}
B=${WORK:?set WORK to a scratch folder}; TRAINED=$B/trained; CTICH=${CTICH_DIR:?set CTICH_DIR}; CQ=${CQ500_DIR:?set CQ500_DIR (a DICOM series)}
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1
cd "$CODE"
[ -d $B/ph ] || $PY phantom.py --out $B/ph --size 64 --patients 12 --slices 8 --seed 0
[ -d $B/phx ] || $PY phantom.py --out $B/phx --size 64 --patients 6 --slices 8 --seed 5
TINY="--image_size 64 --base_channels 8 --channel_mults 1 2 --batch_size 4 --epochs 2 --max_steps 3 --num_workers 0 --seed 1 --eval_every 2"
if [ ! -d $TRAINED ]; then
  mkdir -p $TRAINED
  $PY train.py --data_dir $B/ph --output_dir $TRAINED/ph_single $TINY --eval_samples 8
  $PY train.py --data_dir $B/ph --output_dir $TRAINED/ph_cv --folds 2 $TINY --eval_samples 8
  $PY train.py --data_dir $CTICH --cache_dir $B/cache_ctich --output_dir $TRAINED/ct_single $TINY --eval_samples 8 --num_samples 32 --min_brain_fraction 0.15 --hflip
  $PY train.py --data_dir $CTICH --cache_dir $B/cache_ctich --output_dir $TRAINED/ct_cv --folds 2 $TINY --eval_samples 8 --num_samples 32 --min_brain_fraction 0.15 --hflip
fi
rm -rf $OUT; mkdir -p $OUT; cp -r $TRAINED $OUT/runs; R=$OUT/runs
# training itself, again with CODE (compared to TRAINED's weights)
$PY train.py --data_dir $B/ph --output_dir $OUT/train_ph_single $TINY --eval_samples 8 > $OUT/train_ph_single.log 2>&1
$PY train.py --data_dir $B/ph --output_dir $OUT/train_ph_cv --folds 2 $TINY --eval_samples 8 > $OUT/train_ph_cv.log 2>&1
E="--n_boot 50"
$PY evaluate.py --checkpoint $R/ph_single/best_model.pt --eval_samples all $E --output_dir $OUT/ev_ph_single
$PY evaluate.py --checkpoint $R/ph_single/best_model.pt --split val --eval_samples all $E --output_dir $OUT/ev_ph_single_val
$PY evaluate.py --checkpoint $R/ph_single/best_model.pt --split all --data_dir $B/phx $E --output_dir $OUT/ev_ph_single_all
$PY evaluate.py --checkpoint $R/ph_cv --eval_samples all $E --output_dir $OUT/ev_ph_cv
$PY evaluate.py --checkpoint $R/ph_cv --split all --data_dir $B/phx $E --output_dir $OUT/ev_ph_cv_all
$PY predict.py --checkpoint $R/ph_single/best_model.pt --data_dir $B/phx/stage_2_train --output_dir $OUT/pr_ph_single
$PY predict.py --checkpoint $R/ph_cv --data_dir $B/phx/stage_2_train --output_dir $OUT/pr_ph_cv
S="--eval_t 250 --multi_t --median_sizes 0 5 --smooth_slices 0 2 --residuals positive --n_boot 50"
$PY sweep.py --checkpoint $R/ph_single/best_model.pt $S --output_dir $OUT/sw_ph_single
$PY sweep.py --checkpoint $R/ph_cv $S --anomaly_maps model blood_band --output_dir $OUT/sw_ph_cv
$PY evaluate.py --checkpoint $R/ct_single/best_model_loss.pt --eval_samples 20 --skip_outside_mask $E --output_dir $OUT/ev_ct_single
$PY evaluate.py --checkpoint $R/ct_cv --fold_checkpoint best_model_loss.pt --eval_samples 20 --skip_outside_mask $E --output_dir $OUT/ev_ct_cv
$PY evaluate.py --checkpoint $R/ct_cv --fold_checkpoint best_model_loss.pt --split all --data_dir $B/phx $E --output_dir $OUT/ev_ct_cv_all
$PY predict.py --checkpoint $R/ct_cv --fold_checkpoint best_model_loss.pt --data_dir $CQ --output_dir $OUT/pr_ct_cv
$PY predict.py --checkpoint $R/ct_single/best_model_loss.pt --data_dir $CQ --output_dir $OUT/pr_ct_single
$PY sweep.py --checkpoint $R/ct_cv --fold_checkpoint best_model_loss.pt --eval_samples 20 --skip_outside_mask $S --output_dir $OUT/sw_ct_cv
$PY sweep.py --checkpoint $R/ct_single/best_model_loss.pt --eval_samples 20 $S --output_dir $OUT/sw_ct_single
echo BITCHECK DONE
