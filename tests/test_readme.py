"""The README works as written: every command in its ```bash blocks is run here (in a temp folder, at the
smallest sizes) or marked with the reason it cannot be (a peer, hardware, or a run of minutes to hours).

A command added to or changed in the README fails ``test_every_readme_command_is_run_or_marked`` until it
is entered below, so the README cannot drift from what is tested.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TIMEOUT_S = 300

PEER = "needs a peer this machine does not have (a PLUS server or scanner; the sim-server pair below " \
       "runs the same source)"
TRAINING = "a training run of minutes to hours; its code runs at tiny size in tests/train"
BENCH = "a benchmark of minutes; its code and JSON are tested in tests/bench or by the benches' own tests"
GPU = "needs CUDA"
MULTI_NODE = "needs several machines"

#: README command (whitespace collapsed) -> why it is not run. Every other command must be in RUN.
MARKED = {
    "make demo": "the README's set-up command; runs regseg-stream --demo --max-frames 200 (run below "
                 "at 3 frames)",
    "make test": "the test suite itself (CI runs it)",
    "regseg-stream --mri case.nii.gz --mri-labels case_labels.nii.gz --source igtl://plus-host:18944 "
    "--serve igtl://0.0.0.0:18945 --zmq tcp://0.0.0.0:5556 --reference-to-mri reference_to_mri.txt "
    "--stats-json session_stats.json": PEER,
    "regseg-stream ... --source igtl://plus-host:18944 --record out/session.igs.mha --record-outputs":
        PEER,
    "regseg-stream ... --source grabber://0 --grabber-crop 120,80,640,480 --grabber-spacing-mm 0.19,0.19 "
    "--pose-source igtl://tracker-host:18944": "needs a capture device and a tracker",
    "regseg train alignsegnet --out runs/a": TRAINING,
    "regseg train plcreg2d --out models/weights --minutes 20": TRAINING,
    "regseg train plcreg3d --out models/weights --minutes 14": TRAINING,
    "python -m regseg.train.alignsegnet --out runs/rand_a1 --minutes 40 --samples 3000 "
    "--train-phantoms 48 --val-frames 50 --randomise --plain-fraction 0.2 --init "
    "models/weights/alignsegnet.pt --lr 1e-3 --threads 1": TRAINING,
    "python -m regseg.train.alignsegnet --out runs/rand_a2 --minutes 30 --samples 3000 "
    "--train-phantoms 48 --val-frames 50 --randomise --plain-fraction 0.2 --init "
    "runs/rand_a1/alignsegnet.pt --lr 5e-4 --threads 1": TRAINING,
    "python -m regseg.train.quality --out models/weights --frames 50 --minutes 14": TRAINING,
    "python -m regseg.train.quality_live --out models/weights --train-phantoms 20 --frames 50 "
    "--minutes 6 --randomised-phantoms 15": TRAINING,
    "regseg train quality-calibration --out models/weights": TRAINING + "; tests/train/"
    "test_quality_recipe.py covers the per-chain calibration",
    "python -m regseg.train.compare --families A,Arand,B --levels 0,3,10 --phantoms 4 --frames 10 "
    "--models OLD.pt NEW.pt": TRAINING,
    "python -m regseg.train.alignsegnet --out runs/s11_appearance --minutes 40 --samples 4000 "
    "--train-phantoms 128 --val-frames 50 --randomise --plain-fraction 0.15 --mri-stacks --init "
    "models/weights/alignsegnet.pt --lr 5e-4 --threads 1 --validate-every 300 --augment appearance":
        TRAINING,
    "python -m regseg.train.compare --families A,Arand,Asr --levels 3,10 --phantoms 4 --frames 10 "
    "--a-seed0 3100 --models OLD.pt NEW.pt": TRAINING,
    "python bench/registration.py [--quick] --json out/bench_registration.json": BENCH,
    "pytest -m gpu tests/stream/test_device_ring.py": GPU,
    "python bench/engines.py --device cuda --json out/bench_engines_gpu.json": GPU,
    "python bench/latency.py --device cuda --backend auto --fps 500 --json "
    "out/bench_latency_gpu.json": GPU,
    "python bench/latency.py --device cuda --backend tensorrt --precision fp16 --fps 500 --json "
    "out/bench_latency_trt.json": GPU,
    ".venv/bin/python bench/latency.py --json out/bench_latency.json": BENCH,
    ".venv/bin/python bench/registration.py --json out/bench_registration.json": BENCH,
    ".venv/bin/python bench/engines.py --json out/bench_engines.json": BENCH,
    ".venv/bin/python bench/classical.py --json out/bench_classical.json": BENCH,
    ".venv/bin/python bench/accuracy.py --json out/bench_accuracy.json": BENCH,
    ".venv/bin/python bench/capture.py --family b --json out/bench_capture.json": BENCH,
    ".venv/bin/python bench/trust.py --family b --out out/bench_trust.json": BENCH,
    ".venv/bin/python bench/roi.py --json out/bench_roi.json": BENCH,
    ".venv/bin/python bench/lc2.py --json out/bench_lc2.json": BENCH,
    ".venv/bin/python bench/steps.py --json out/bench_steps.json": BENCH,
    ".venv/bin/python bench/seg_context.py --json out/bench_seg_context.json": BENCH,
    ".venv/bin/python bench/ceiling.py --json out/bench_ceiling.json": BENCH + "; a small real run in "
    "tests/bench/test_ceiling.py",
    ".venv/bin/python bench/frame_size.py --json out/bench_frame_size.json": BENCH + "; its parts in "
    "tests/bench/test_frame_size.py",
    ".venv/bin/python bench/ablation.py --json out/bench_ablation.json": BENCH,
    "regseg-stream --mri case.nii.gz --mri-labels case_labels.nii.gz --source igtl://plus-host:18944 "
    "--probe-calibration calib/PlusDeviceSet_calibrated.xml --time-offset-ms 86.7 --reference-to-mri "
    "calib/ReferenceToMRI.tfm": PEER + "; tests/calibration/test_stream_probe_calibration.py streams "
    "the same chain from the simulated scanner",
    "python bench/calibration.py --quick --json out/calibration.json": BENCH,
    "regseg-serve --demo 2 --web 127.0.0.1:8080": "a server that runs until Ctrl-C; "
    "tests/web/test_two_scanners.py starts regseg-serve as a user does, with two browsers",
    "regseg-serve --config serve.toml --web 127.0.0.1:8080": "needs the scanners and cases "
    "serve.toml names; tests/serve runs configs of simulated and OpenIGTLink sessions",
    "curl http://127.0.0.1:8765/sessions": "needs a running regseg-serve; tests/serve/"
    "test_control.py makes the same requests",
    "curl -X POST -H 'Content-Type: application/json' -d '{\"name\": \"room3\", \"source\": "
    "\"sim://3\"}' "
    "http://127.0.0.1:8765/sessions": "needs a running regseg-serve; tests/serve/test_control.py",
    "curl -X DELETE http://127.0.0.1:8765/sessions/room3": "needs a running regseg-serve; "
    "tests/serve/test_control.py",
    "regseg-stream --demo --web 127.0.0.1:8080": "runs until Ctrl-C and needs a browser; "
    "tests/web/test_stream_web.py drives it with headless Chromium",
    "python bench/serve.py --quick --json out/bench_serve.json": BENCH,
    "torchrun --nproc-per-node 2 -m regseg.train alignsegnet --out runs/a2 --minutes 1 --samples 64 "
    "--train-phantoms 2 --val-phantoms 1 --val-frames 8 --batch-size 8": TRAINING + "; "
    "tests/train/test_distributed.py runs the same recipe under torchrun with 2 CPU ranks",
    "torchrun --nproc-per-node 2 -m regseg.train plcreg3d --out runs/p3 --minutes 2 --pool 4 "
    "--val-pairs 1 --batch-size 2": TRAINING + "; tests/train/test_distributed.py",
    "torchrun --nproc-per-node 2 -m regseg.train plcreg3d --out runs/p3 --minutes 2 --pool 4 "
    "--val-pairs 1 --batch-size 2 --resume": TRAINING + "; --resume is tested in "
    "tests/train/test_distributed.py",
    "torchrun --nproc-per-node 2 -m regseg.train plcreg2d --out runs/p2 --steps 20 --frames 16 "
    "--phantoms 2 --val-frames 2 --batch-size 4": TRAINING + "; tests/train/test_distributed.py "
    "runs plcreg2d under torchrun with 2 CPU ranks",
    "torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint node0:29500 "
    "--rdzv-id p3 -m regseg.train plcreg3d --out /shared/runs/p3 --batch-size 8": MULTI_NODE,
    "regseg mni --out data/mni50 --pairs 52": "52 pairs take minutes; the same command runs at 1 "
    "pair in the scenario below",
    "regseg batch register data/mni50/pairs.csv --out out/b50": "52 registrations (minutes); "
    "tests/batch/test_batch.py runs batch register on small pairs",
    "torchrun --nproc-per-node 2 -m regseg.batch register data/mni50/pairs.csv --out out/b50 "
    "--no-affine": "minutes; tests/batch/test_batch.py runs the same with 2 ranks on small pairs",
    "regseg batch segment targets.jsonl --out out/seg --atlas atlas.nii.gz --atlas-labels "
    "atlas_labels.nii.gz": "needs the user's images and atlas; tests/batch/test_batch.py covers "
    "segment",
    "regseg mas --simulate data/mas --n-atlases 4 --n-targets 8": "renders 12 sweep volumes "
    "(minutes); tests/mas/test_mas_cli.py simulates smaller sets",
    "regseg batch mas data/mas/targets.csv --out out/mas --method jlf": "8 targets x 4 atlases "
    "(minutes); tests/batch/test_batch_mas.py runs batch mas on a miniature brain set",
    "regseg register-mri --mri case.nii.gz --mri-labels case_labels.nii.gz --sweep "
    "out/sweep_volume.nii.gz [--initial reference_to_mri_nominal.tfm] --out "
    "out/reference_to_mri.tfm [--ddf-out out/sweep_ddf_mm.nii.gz] [--truth true.tfm] "
    "[--method affine|biregnet]": "the general form with the user's files; the simulated case "
    "above runs it, tests/sweep/test_register_mri.py the options",
    "regseg-stream --mri case.nii.gz --mri-labels case_labels.nii.gz --reference-to-mri "
    "out/reference_to_mri.tfm --source igtl://127.0.0.1:18944": PEER,
    "python bench/mas_registration.py --json bench/results/mas_registration.json": BENCH,
    "regseg train biregnet --out runs/biregnet --minutes 24": TRAINING,
    "regseg mas --simulate demo/mas --n-atlases 4 --n-targets 1": "simulates 5 sweep cases "
    "(~25 s unloaded); tests/mas/test_mas_cli.py simulates and segments smaller sets",
    "regseg mas --atlases demo/mas/atlases --target demo/mas/targets/target_13000.nii.gz --truth "
    "demo/mas/targets/target_13000_truth.nii.gz --target-offset-mm 0.7 -14.5 1.0 --registration "
    "affine --out out/mas": "4 cross-modal registrations (~40 s unloaded, minutes loaded); "
    "tests/mas/test_mas_cli.py",
    "regseg mas --simulate demo/brain --kind brain --n-atlases 3 --n-targets 1": "loads MNI152 + "
    "AAL and warps 4 full-size subjects; tests/mas/test_mas_cli.py runs a miniature brain set",
    "regseg mas --atlases demo/brain/atlases --target demo/brain/targets/target_40000.nii.gz "
    "--truth demo/brain/targets/target_40000_truth.nii.gz --method jlf --registration affine "
    "--initial identity --out out/mas-brain": "3 full-size brain registrations, minutes on CPU; "
    "tests/mas/test_mas_cli.py runs it at a miniature size",
    "python bench/mas.py --quick --json out/mas.json": BENCH,
    # TRUST4 (issue 16): the shipped AlignSegNet's fine-tune and its held-out comparison
    "python -m regseg.train.alignsegnet --out runs/trust4 --minutes 50 --samples 4000 "
    "--train-phantoms 128 --val-frames 50 --randomise --plain-fraction 0.15 --mri-stacks --init "
    "models/weights/alignsegnet.pt --lr 5e-4 --threads 1 --validate-every 300": TRAINING,
    "python bench/alignsegnet_val.py --weights OLD.pt NEW.pt": "needs two checkpoints and renders "
    "600 held-out frames when its cache is empty (minutes); tests/test_mri_stack.py covers the stack sets",
    # GATE (issue 16): recording the do-no-harm alternatives (the replay is run)
    "python bench/do_no_harm.py --family a --frames 12 --out bench/results/do_no_harm_a.json": BENCH,
    "python bench/do_no_harm.py --family b --frames 12 --choice bench/results/do_no_harm_a.json "
    "--out bench/results/do_no_harm_b.json": BENCH,
    # BRAIN (issue 12): warpseg-brain's training, use and bench
    "regseg train warpseg --task brain --out models/weights --minutes 38 --atlases 4 "
    "--unlabelled 12": TRAINING,
    "regseg train warpseg --task brain --single-decoder --out models/weights --minutes 60 "
    "--steps 1098 --atlases 4 --unlabelled 12 --threads 2": TRAINING,
    "regseg segment --model warpseg-brain --mri subject.nii.gz --out labels.nii.gz":
        "needs an input image; tests/warpseg/test_brain.py runs this command on a synthetic subject",
    "python bench/warpseg.py --task brain --cases 4 --json "
    "bench/results/warpseg_brain_quick.json": BENCH,
    # REG18 (issue 18): the 1.5 mm bench and its validation sweep, registering at 1.5 mm
    "python bench/registration.py --pairs 8 --skip-phantom --spacing 1.5 --refine 0 20 25 50 "
    "--refine-fine 0 10 20 --ants-settings SyN --sitk-pairs 1 --threads 2 "
    "--json bench/results/registration_mni_1.5mm.json": BENCH,
    "python bench/registration.py --pairs 7 --first-seed 10001 --skip-phantom --spacing 1.5 "
    "--refine 20 25 --refine-fine 0 --no-default --no-ants --sitk-pairs 7 --threads 2 "
    "--json bench/results/registration_mni_1.5mm_simpleitk_rest.json": BENCH,
    "python bench/registration.py --pairs 4 --first-seed 20000 --skip-phantom --spacing 1.5 "
    "--refine 10 15 20 25 --refine-fine 0 --ants-settings SyN --sitk-pairs 0 --no-default "
    "--threads 2 --json bench/results/registration_mni_1.5mm_validation_fewer_steps.json": BENCH,
    "python bench/registration.py --pairs 4 --first-seed 20000 --skip-phantom --spacing 1.5 "
    "--refine 25 50 --refine-fine 0 10 20 30 --ants-settings SyN --sitk-pairs 0 --no-default "
    "--threads 2 --json bench/results/registration_mni_1.5mm_validation_fast.json": BENCH,
    "python bench/registration.py --pairs 4 --first-seed 20000 --skip-phantom --spacing 1.5 "
    "--refine 50 --refine-fine 0 --refine-mode full --no-baselines --no-default --threads 2 "
    "--json bench/results/registration_mni_1.5mm_validation_full.json": BENCH,
    "python bench/registration.py --pairs 4 --first-seed 20000 --skip-phantom --spacing 1.5 "
    "--refine 15 20 25 30 40 --refine-fine 0 --refine-mode fast sampled --ants-settings SyN "
    "--sitk-pairs 0 --no-default --threads 2 "
    "--json bench/results/registration_mni_1.5mm_validation_sampled.json": BENCH,
    "python bench/registration.py --pairs 8 --first-seed 10000 --skip-phantom --spacing 1.5 "
    "--refine 20 25 --refine-fine 0 --refine-mode fast sampled --ants-settings SyN "
    "--sitk-pairs 0 --threads 2 --json bench/results/registration_mni_1.5mm_sampled.json": BENCH,
    "python bench/registration.py --pairs 4 --first-seed 20000 --skip-phantom --spacing 1.5 "
    "--refine 20 25 --refine-fine 0 --refine-mode sampled --refine-int-steps 7 5 4 "
    "--ants-settings SyN --sitk-pairs 0 --no-default --threads 2 "
    "--json bench/results/registration_mni_1.5mm_validation_loop_int.json": BENCH,
    "python bench/registration.py --pairs 8 --first-seed 10000 --skip-phantom --spacing 1.5 "
    "--refine 25 --refine-fine 0 --refine-mode sampled --refine-int-steps 7 5 "
    "--ants-settings SyN --sitk-pairs 0 --threads 2 "
    "--json bench/results/registration_mni_1.5mm_loop_int.json": BENCH,
    "python bench/registration.py --pairs 4 --first-seed 20000 --skip-phantom --spacing 1.5 "
    "--refine 20 25 --refine-fine 0 --refine-mode sampled --refine-regulariser working coarse "
    "--ants-settings SyN --sitk-pairs 0 --no-default --threads 2 "
    "--json bench/results/registration_mni_1.5mm_validation_coarse_reg.json": BENCH,
    "python bench/registration.py --pairs 8 --first-seed 10000 --skip-phantom --spacing 1.5 "
    "--refine 25 --refine-fine 0 --refine-mode sampled --refine-regulariser working coarse "
    "--ants-settings SyN --sitk-pairs 0 --threads 2 "
    "--json bench/results/registration_mni_1.5mm_coarse_reg.json": BENCH,
    "python bench/registration.py --pairs 8 --first-seed 10000 --skip-phantom --spacing 1.5 "
    "--refine 25 --refine-fine 0 --refine-mode sampled --ants-settings SyN --sitk-pairs 0 "
    "--threads 2 --json bench/results/registration_mni_1.5mm_split.json": BENCH,
    "python bench/registration.py --pairs 4 --first-seed 20000 --skip-phantom --spacing 1.5 "
    "--refine 15 20 25 --refine-fine 0 --refine-mode sampled --refine-lr 0.05 0.07 0.1 "
    "--ants-settings SyN --sitk-pairs 0 --no-default --threads 2 "
    "--json bench/results/registration_mni_1.5mm_validation_step_size.json": BENCH,
    "python bench/registration.py --pairs 8 --first-seed 10000 --skip-phantom --spacing 1.5 "
    "--refine 15 25 --refine-fine 0 --refine-mode sampled --refine-lr 0.1 0.05 "
    "--ants-settings SyN --sitk-pairs 0 --threads 2 "
    "--json bench/results/registration_mni_1.5mm_step_size.json": BENCH,
    "python bench/registration.py --pairs 4 --first-seed 20000 --skip-phantom --spacing 1.5 "
    "--refine 15 --refine-fine 0 --refine-mode sampled --affine-iterations 20 10 5 0 "
    "--ants-settings SyN --sitk-pairs 0 --no-default --threads 2 "
    "--json bench/results/registration_mni_1.5mm_validation_affine_steps.json": BENCH,
    "python bench/registration.py --pairs 4 --first-seed 20000 --skip-phantom --spacing 1.5 "
    "--refine 10 12 15 --refine-fine 0 --refine-mode sampled --refine-lr 0.1 0.15 "
    "--ants-settings SyN --sitk-pairs 0 --no-default --threads 2 "
    "--json bench/results/registration_mni_1.5mm_validation_steps_s13.json": BENCH,
    "python bench/registration.py --pairs 8 --first-seed 10000 --skip-phantom --spacing 1.5 "
    "--refine 12 15 --refine-fine 0 --refine-mode sampled --refine-lr 0.15 0.1 "
    "--ants-settings SyN --sitk-pairs 8 --threads 2 "
    "--json bench/results/registration_mni_1.5mm_steps_s13.json": BENCH,
    "python bench/registration.py --pairs 8 --first-seed 10000 --skip-phantom --spacing 1.5 "
    "--refine 12 25 50 --refine-fine 0 --ants-settings SyN --sitk-pairs 8 --threads 2 "
    "--json bench/results/registration_mni_1.5mm_s13.json": BENCH,
    "python bench/registration.py --pairs 8 --first-seed 10000 --skip-phantom --spacing 1.5 "
    "--refine 12 --refine-fine 0 --ants-settings SyN --sitk-pairs 0 --no-default --threads 2 "
    "--json bench/results/registration_mni_1.5mm_s13_ants.json": BENCH,
    "python bench/registration.py --pairs 2 --first-seed 10000 --skip-phantom --spacing 1.5 "
    "--refine 12 50 --refine-fine 0 --ants-settings SyN SyNCC --sitk-pairs 0 --threads 2 "
    "--json bench/results/registration_mni_1.5mm_syncc.json": BENCH,
    "regseg train plcreg3d --out runs/plcreg3d_1.5mm --spacing 1.5 --minutes 60": TRAINING,
    "bash bench/gpu_train_plcreg3d.sh --dry-run": "tests/bench/test_gpu_check.py runs exactly this",
    "make gpu-wheels": "downloads wheels from PyPI for the GPU machine (run by hand before a device "
                       "call; tests run nothing from the network)",
    "python bench/plcreg3d_grid.py --json bench/results/plcreg3d_grid.json": BENCH,
    "REGSEG_NUMBA=0 python bench/registration.py --pairs 4 --first-seed 20000 --skip-phantom "
    "--spacing 1.5 --refine 12 --refine-fine 0 --no-baselines --no-default --threads 2 "
    "--json bench/results/registration_mni_1.5mm_validation_sampler_torch.json": BENCH,
    "python bench/registration.py --pairs 4 --first-seed 20000 --skip-phantom --spacing 1.5 "
    "--refine 12 --refine-fine 0 --no-baselines --no-default --threads 2 "
    "--json bench/results/registration_mni_1.5mm_validation_sampler_numba.json": BENCH,
    "python bench/pipeline_capture.py --pairs 3 --first-seed 20000 --rotations 0 10 20 25 "
    "--spacing 1.5 --json bench/results/pipeline_capture_validation.json":
        "whole-pipeline capture on 3 validation pairs at 1.5 mm (~3 min); "
        "tests/bench/test_pipeline_capture.py runs it on one 3.25 mm pair",
    "regseg mni --out out/mni15 --pairs 2 --spacing 1.5":
        "writes 2 pairs at 1.5 mm (~25 s); tests/test_mni_spacing.py runs regseg mni --spacing on a coarser grid",
    "regseg register --pairs out/mni15 --out out/reg15":
        "registers 2 pairs at 1.5 mm (~10 s); needs regseg mni's 1.5 mm set",
    "regseg register --pairs out/mni15 --out out/reg15 --refine 50 --refine-fine 20":
        "registers 2 pairs at 1.5 mm (~25 s); needs regseg mni's 1.5 mm set",
    "regseg register --pairs out/mni15 --out out/reg15 --refine 0 --refine-fine 0":
        "registers 2 pairs at 1.5 mm (a few s); needs regseg mni's 1.5 mm set",
    # MAS2 (issue 11): the retrained SimNet's command, the full fusion bench and the JLF tuning
    "regseg train simnet --out runs/simnet --targets 10 --atlases 4 --val-targets 4 --minutes 22":
        TRAINING,
    "python bench/mas.py --targets 8 --atlases 4 --cache-dir /tmp/mas_eval_cache "
    "--skip-registration-bench --json bench/results/mas.json": BENCH,
    "python bench/mas_tune_jlf.py --json bench/results/mas_jlf_tuning.json": BENCH,
    "python bench/mas_tune_jlf.py --radii 3 4 5 --betas 0.5 --alphas 0.1 1 --dilations 2 4 "
    "--json bench/results/mas_jlf_tuning_2.json": BENCH,
    "regseg register --pairs out/mni --out out/reg --affine learned+optimise": 'needs the MNI set (regseg mni, nilearn) and registers 8 pairs (minutes); tests/models/test_affine3d.py runs regseg register --affine learned on one pair',
    "regseg register --pairs out/mni --out out/reg --affine learned": 'needs the MNI set (regseg mni, nilearn) and registers 8 pairs (minutes); tests/models/test_affine3d.py runs regseg register --affine learned on one pair',
    "regseg register --pairs out/mni --out out/reg --affine optimise --affine-iterations 120":
        'needs the MNI set (regseg mni, nilearn) and registers 8 pairs (minutes); tests/models/test_affine3d.py runs regseg register --affine learned on one pair',
    "regseg train affine3d --out models/weights --minutes 22": TRAINING,
    "python bench/affine_capture.py --pairs 2 --json bench/results/affine_capture.json": BENCH,
    "python bench/affine_capture.py --validation --pairs 3 --sweep 0 10 20 40": BENCH,
    "regseg pseudolabel --atlas atlas.nii.gz --atlas-labels atlas_zones.nii.gz --images "
    "unlabelled/ --out pseudo/": "needs an atlas and a folder of images (10-60 s per registration); "
    "tests/warpseg/test_pseudolabel.py runs it at small size",
    "regseg segment --model warpseg-prostate --mri case.nii.gz --out case_labels.nii.gz": "would "
    "overwrite the scenario's true case_labels.nii.gz; tests/warpseg/test_engine_cli.py and "
    "test_segment_stream_e2e.py run it on a held-out phantom",
    "regseg-stream --mri case.nii.gz --mri-labels case_labels.nii.gz --source "
    "igtl://plus-host:18944": PEER,
    "regseg train warpseg --out models/weights --minutes 58 --atlases 4 --unlabelled 12": TRAINING,
    "regseg train warpseg --out models/weights --minutes 58 --atlases 4 --unlabelled 12 "
    "--single-decoder": TRAINING,
    "flock /tmp/regseg-cpu.lock python bench/warpseg.py --quick --json "
    "bench/results/warpseg_quick.json": BENCH,
    "torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint node0:29500 "
    "--rdzv-id reg1 -m regseg.batch register /shared/pairs.csv --out /shared/out --device cuda":
        MULTI_NODE,
    "bash bench/gpu_check.sh --dry-run": "tests/bench/test_gpu_check.py runs exactly this",
    'make gpu-check GPU_CHECK_ARGS="--out out/gpu_check --data data/mni4"': GPU,
    ".venv/bin/python bench/batch.py --quick --json out/bench_batch.json": BENCH,
    "regseg train ascseg --out runs/ascseg --trus-only --minutes 62": TRAINING,
    "regseg train ascseg --out runs/ascseg --minutes 62": TRAINING,
    "regseg train ascseg --arch monai_unet --out runs/ascseg --minutes 40": TRAINING,
    "regseg train ascseg --arch monai_unetr --out runs/ascseg --minutes 40": TRAINING,
    "python bench/segmentation.py --quick --json bench/results/segmentation_quick.json": BENCH,
}

CASE = "--mri case.nii.gz --mri-labels case_labels.nii.gz"
PAIR = "out/mni/pair000"
#: README command -> the command run (placeholders filled, sizes smallest). The scenario test runs them.
RUN = {
    "regseg phantom --out DIR --seed N": "regseg phantom --out . --seed 0",
    "regseg-igt sim-server --port 18944 --write-case out/case":
        "regseg-igt sim-server --port {sim_port} --write-case out/case",
    "regseg-stream --mri out/case/case.nii.gz --mri-labels out/case/case_labels.nii.gz --source "
    "igtl://127.0.0.1:18944 --serve igtl://127.0.0.1:18945":
        "regseg-stream --mri out/case/case.nii.gz --mri-labels out/case/case_labels.nii.gz --source "
        "igtl://127.0.0.1:{sim_port} --serve igtl://127.0.0.1:{serve_port} --max-frames 3 --quiet",
    "regseg-stream --demo --segmenter ascseg-trus --max-frames 30":
        "regseg-stream --demo --segmenter ascseg-trus --max-frames 3 --serve none --zmq none --quiet",
    "regseg-stream --demo --deformable async|on|off":
        "regseg-stream --demo --deformable {on_off} --max-frames 3 --serve none --zmq none --quiet",
    "regseg-stream --demo --do-no-harm on --max-frames 60":
        "regseg-stream --demo --do-no-harm on --max-frames 3 --serve none --zmq none --quiet",
    "python bench/do_no_harm.py --family b --records bench/results/do_no_harm_b.json --choice "
    "bench/results/do_no_harm_a.json --out /tmp/do_no_harm_b.json":
        "python {repo}/bench/do_no_harm.py --family b --records {repo}/bench/results/do_no_harm_b.json "
        "--choice {repo}/bench/results/do_no_harm_a.json --out do_no_harm_b.json",
    "regseg-stream --mri case.nii.gz --mri-labels case_labels.nii.gz --source file://session.igs.mha "
    "--replay-rate recorded":
        f"regseg-stream {CASE} --source file://session.igs.mha --replay-rate recorded --max-frames 3 "
        "--quiet",
    "regseg-igt recover out/session.igs.mha": "regseg-igt recover out/session.igs.mha",
    "regseg reconstruct out/sweep.igs.mha --out out/sweep_volume.nii.gz --spacing 0.5 --coverage-out "
    "out/sweep_coverage.nii.gz":
        "regseg reconstruct session.igs.mha --out out/sweep_volume.nii.gz --spacing 1.0 "
        "--coverage-out out/sweep_coverage.nii.gz",
    "regseg-stream ... --source recorded_screen.mp4 --grabber-crop 120,80,640,480":
        f"regseg-stream {CASE} --source recorded_screen.mp4 --grabber-crop 120,80,640,480 "
        "--max-frames 2 --quiet",
    'python -c "from regseg.sim.sweep import make_sweep_case, write_sweep_case; write_sweep_case(make_sweep_case(13000), \'out/sweep_case\')"': 'python -c "from regseg.sim.sweep import make_sweep_case, write_sweep_case; write_sweep_case(make_sweep_case(13000), \'out/sweep_case\')"',
    'regseg register-mri --mri out/sweep_case/mri.nii.gz --mri-labels out/sweep_case/mri_labels.nii.gz --sweep out/sweep_case/trus.nii.gz --initial out/sweep_case/reference_to_mri_initial.tfm --truth out/sweep_case/reference_to_mri_true.tfm --out out/sweep_case/reference_to_mri.tfm':
        'regseg register-mri --mri out/sweep_case/mri.nii.gz --mri-labels out/sweep_case/mri_labels.nii.gz --sweep out/sweep_case/trus.nii.gz --initial out/sweep_case/reference_to_mri_initial.tfm --truth out/sweep_case/reference_to_mri_true.tfm --out out/sweep_case/reference_to_mri.tfm',
    "regseg calibrate simulate --out calib": "regseg calibrate simulate --out calib",
    "regseg calibrate pivot --input calib/pivot.csv --out calib/StylusTipToStylus.tfm --report "
    "calib/pivot.json --plot calib/pivot.png": "regseg calibrate pivot --input calib/pivot.csv --out "
    "calib/StylusTipToStylus.tfm --report calib/pivot.json --plot calib/pivot.png",
    "regseg calibrate probe --input calib/nwire.igs.mha --phantom-to-tracker "
    "calib/phantom_to_tracker.txt --out calib/PlusDeviceSet_calibrated.xml --report calib/probe.json "
    "--plot calib/probe.png": "regseg calibrate probe --input calib/nwire.igs.mha "
    "--phantom-to-tracker calib/phantom_to_tracker.txt --out calib/PlusDeviceSet_calibrated.xml "
    "--report calib/probe.json --plot calib/probe.png",
    "regseg calibrate temporal --input calib/temporal_video.igs.mha --tracking "
    "calib/temporal_tracker.csv --report calib/temporal.json --plot calib/temporal.png":
        "regseg calibrate temporal --input calib/temporal_video.igs.mha --tracking "
        "calib/temporal_tracker.csv --report calib/temporal.json --plot calib/temporal.png",
    "regseg calibrate landmarks --fixed calib/landmarks_mri.mrk.json --moving "
    "calib/landmarks_reference.fcsv --out calib/ReferenceToMRI.tfm --report calib/landmarks.json":
        "regseg calibrate landmarks --fixed calib/landmarks_mri.mrk.json --moving "
        "calib/landmarks_reference.fcsv --out calib/ReferenceToMRI.tfm --report calib/landmarks.json",
    "regseg mni --out out/mni --pairs 8": "regseg mni --out out/mni --pairs 1",
    "regseg register --pairs out/mni --out out/reg": "regseg register --pairs out/mni --out out/reg",
    "regseg register --fixed F.nii.gz --moving M.nii.gz --moving-labels L.nii.gz [--fixed-labels "
    "FL.nii.gz] [--landmarks LM.csv] --out out/one [--device cuda]":
        f"regseg register --fixed {PAIR}/fixed.nii.gz --moving {PAIR}/moving.nii.gz --moving-labels "
        f"{PAIR}/moving_labels.nii.gz --fixed-labels {PAIR}/fixed_labels.nii.gz --landmarks "
        f"{PAIR}/landmarks.csv --out out/one",
    "regseg eval --fixed-labels FL.nii.gz --moved-labels out/one/moved_labels.nii.gz --ddf "
    "out/one/ddf_mm.nii.gz [--landmarks LM.csv]":
        f"regseg eval --fixed-labels {PAIR}/fixed_labels.nii.gz --moved-labels "
        f"out/one/moved_labels.nii.gz --ddf out/one/ddf_mm.nii.gz --landmarks {PAIR}/landmarks.csv",
}


def readme_commands() -> list[str]:
    """Commands of the ```bash blocks of the README and docs/*.md (the README's measurements and
    history moved there): continuations joined, comments and blanks dropped."""
    text = "\n".join(p.read_text() for p in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))))
    commands = []
    for block in re.finditer(r"^[ \t]*```bash\n(.*?)^[ \t]*```", text, re.S | re.M):
        body = re.sub(r"\\\n\s*", " ", block.group(1))
        for line in body.splitlines():
            command = " ".join(re.split(r"\s+#", line)[0].split())
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_every_readme_command_is_run_or_marked():
    commands = readme_commands()
    assert len(commands) > 20, "the README's bash blocks were not found"
    unknown = [c for c in commands if c not in RUN and c not in MARKED]
    assert not unknown, ("README commands neither run nor marked in tests/test_readme.py (add them "
                         f"to RUN or MARKED): {unknown}")
    stale = [c for c in (*RUN, *MARKED) if c not in commands]
    assert not stale, f"entries for commands no longer in the README: {stale}"


def run(command: str, cwd: Path, **format_args) -> subprocess.CompletedProcess:
    """Run one command (our console scripts from this interpreter's environment) and require exit 0."""
    argv = shlex.split(command.format(**format_args))
    argv[0] = str(BIN / argv[0])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, f"{command}: exit {done.returncode}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr
    return done


def write_video(path: Path, frames: int = 4) -> None:
    cv2 = pytest.importorskip("cv2")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10.0, (800, 600))
    rng = np.random.default_rng(0)
    for _ in range(frames):
        writer.write(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8))
    writer.release()
    if not path.exists() or path.stat().st_size == 0:
        pytest.skip("this OpenCV build cannot write mp4v video")


@pytest.mark.slow
def test_readme_commands_work_as_written(tmp_path, free_port):
    """The runnable README commands, in the order a new user meets them."""
    ran = set()

    def readme(command: str, **format_args) -> subprocess.CompletedProcess:
        ran.add(command)
        return run(RUN[command], tmp_path, **format_args)

    # The patient case of the demo phantom (seed 0), for the file and video sources.
    readme("regseg phantom --out DIR --seed N")
    assert (tmp_path / "case.nii.gz").exists() and (tmp_path / "case_labels.nii.gz").exists()

    # Quick start: the PLUS stand-in and regseg-stream on it.
    sim_cmd = RUN["regseg-igt sim-server --port 18944 --write-case out/case"].format(sim_port=0)
    ran.add("regseg-igt sim-server --port 18944 --write-case out/case")
    sim = subprocess.Popen([str(BIN / "regseg-igt"), *sim_cmd.split()[1:]], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "--mri" in sim.stdout.readline()
        sim_port = int(re.search(r"igtl://127\.0\.0\.1:(\d+)", sim.stdout.readline()).group(1))
        out = readme("regseg-stream --mri out/case/case.nii.gz --mri-labels "
                     "out/case/case_labels.nii.gz --source igtl://127.0.0.1:18944 --serve "
                     "igtl://127.0.0.1:18945", sim_port=sim_port, serve_port=free_port()).stdout
        assert "end-to-end" in out
    finally:
        sim.send_signal(signal.SIGTERM)
        sim.communicate(timeout=60)
    assert sim.returncode == 0

    for on_off in ("async", "on", "off"):
        readme("regseg-stream --demo --deformable async|on|off", on_off=on_off)
    readme("regseg-stream --demo --segmenter ascseg-trus --max-frames 30")
    readme("regseg-stream --demo --do-no-harm on --max-frames 60")
    readme("python bench/do_no_harm.py --family b --records bench/results/do_no_harm_b.json "
           "--choice bench/results/do_no_harm_a.json --out /tmp/do_no_harm_b.json", repo=ROOT)
    assert json.loads((tmp_path / "do_no_harm_b.json").read_text())["results"]

    # Replay a recording (made here by the demo, which records what the scanner sends).
    run("regseg-stream --demo --max-frames 4 --serve none --zmq none --quiet --record "
        "session.igs.mha", tmp_path)
    readme("regseg-stream --mri case.nii.gz --mri-labels case_labels.nii.gz --source "
           "file://session.igs.mha --replay-rate recorded")

    # The same recording (a demo's tracked frames) compounded into a volume.
    readme("regseg reconstruct out/sweep.igs.mha --out out/sweep_volume.nii.gz --spacing 0.5 "
           "--coverage-out out/sweep_coverage.nii.gz")
    assert (tmp_path / "out" / "sweep_volume.json").exists()

    # Start the case: a simulated sweep case, its MRI registered to the sweep from 10 mm / 10° off.
    readme('python -c "from regseg.sim.sweep import make_sweep_case, write_sweep_case; write_sweep_case(make_sweep_case(13000), \'out/sweep_case\')"')
    readme('regseg register-mri --mri out/sweep_case/mri.nii.gz --mri-labels out/sweep_case/mri_labels.nii.gz --sweep out/sweep_case/trus.nii.gz --initial out/sweep_case/reference_to_mri_initial.tfm --truth out/sweep_case/reference_to_mri_true.tfm --out out/sweep_case/reference_to_mri.tfm')
    report = json.loads((tmp_path / "out" / "sweep_case" / "reference_to_mri.json").read_text())
    assert report["tre_mm_initial"] > 8.0 and report["tre_mm"] < 2.0

    # A recording a killed process left unfinished.
    from regseg.sequence_writer import SequenceWriter

    writer = SequenceWriter(tmp_path / "out" / "session.igs.mha")
    writer.add(np.zeros((8, 8), np.uint8), {"FrameNumber": "0", "Timestamp": "0.0"})
    assert "recovered 1 frames" in readme("regseg-igt recover out/session.igs.mha").stdout

    write_video(tmp_path / "recorded_screen.mp4")
    readme("regseg-stream ... --source recorded_screen.mp4 --grabber-crop 120,80,640,480")

    # Before the case: every calibration step on a simulated session, in the README's order.
    readme("regseg calibrate simulate --out calib")
    readme("regseg calibrate pivot --input calib/pivot.csv --out calib/StylusTipToStylus.tfm "
           "--report calib/pivot.json --plot calib/pivot.png")
    readme("regseg calibrate probe --input calib/nwire.igs.mha --phantom-to-tracker "
           "calib/phantom_to_tracker.txt --out calib/PlusDeviceSet_calibrated.xml --report "
           "calib/probe.json --plot calib/probe.png")
    readme("regseg calibrate temporal --input calib/temporal_video.igs.mha --tracking "
           "calib/temporal_tracker.csv --report calib/temporal.json --plot calib/temporal.png")
    readme("regseg calibrate landmarks --fixed calib/landmarks_mri.mrk.json --moving "
           "calib/landmarks_reference.fcsv --out calib/ReferenceToMRI.tfm --report "
           "calib/landmarks.json")
    assert (tmp_path / "calib" / "ReferenceToMRI.tfm").exists()

    # Offline registration on the MNI152 set (nilearn: the registration extra).
    pytest.importorskip("nilearn")
    readme("regseg mni --out out/mni --pairs 8")
    readme("regseg register --pairs out/mni --out out/reg")
    assert (tmp_path / "out" / "reg" / "pair000" / "moved.nii.gz").exists()
    readme("regseg register --fixed F.nii.gz --moving M.nii.gz --moving-labels L.nii.gz "
           "[--fixed-labels FL.nii.gz] [--landmarks LM.csv] --out out/one [--device cuda]")
    report = json.loads((tmp_path / "out" / "one" / "report.json").read_text())
    assert report["dice_mean"] > report["dice_before_mean"]
    readme("regseg eval --fixed-labels FL.nii.gz --moved-labels out/one/moved_labels.nii.gz --ddf "
           "out/one/ddf_mm.nii.gz [--landmarks LM.csv]")
    assert ran == set(RUN), f"RUN entries the scenario did not run: {set(RUN) - ran}"
