"""Trained-run folders made without training (untrained tiny models with the files train.py writes), for tests of
what opens, checks and scores a run: they cost a second, not a training run."""
import os

import torch

import cv
import inputs
import models


def tiny_diffusion():
    torch.manual_seed(0)
    network = models.model_config(pretrained=False, in_channels=1, image_size=32, base_channels=8, channel_mults=[1, 2],
                                  dropout=0.0, hf_model="unused")
    return models.build_diffusion(models.diffusion_config(network, patch_size=8, input_hu=inputs.native_input_hu("rsna", 1)))


def write_cv_run(run_dir, index, data_dir, seed, k=2):
    """A CV run folder as train.py --folds leaves it, without training: folds.json and fold_<k>/best_model.pt whose
    checkpoints carry their fold's splits record (cv.fold_splits_record)."""
    record = cv.assign_folds(index, k, seed)
    os.makedirs(run_dir, exist_ok=True)
    cv.write_folds(run_dir, record)
    diffusion = tiny_diffusion()
    for fold in range(k):
        splits = cv.fold_splits_record(index, record, fold, data_dir=data_dir, dataset="rsna")
        os.makedirs(cv.fold_dir(run_dir, fold), exist_ok=True)
        models.save_checkpoint(os.path.join(cv.fold_dir(run_dir, fold), "best_model.pt"), diffusion, splits=splits,
                               args={"data_dir": data_dir, "seed": seed, "image_size": 32, "num_workers": 0,
                                     "eval_samples": "all"})
    return record
