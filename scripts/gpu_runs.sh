#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md, in parts that each fit one 10-minute call on one H100.
#
#   scripts/gpu_runs.sh bench     # train-step MFU of DiT-S/2, DiT-B/2 and the CIFAR U-Net (bf16,
#                                 # batch 256); step rates of the MNIST configs (to size the
#                                 # runs below); FID of 50,000 given images, end to end
#   scripts/gpu_runs.sh fid       # the FID part of bench alone, at each Inception precision
#                                 # of FID_PRECISIONS (default: highest tf32x3 default)
#   scripts/gpu_runs.sh unet      # MNIST U-Net: UNET_SECONDS of training (time-boxed) or
#                                 # UNET_STEPS steps; sample grid, loss curve, FID
#   scripts/gpu_runs.sh shortcut  # shortcut DiT and flow-matching DiT, SC_STEPS steps each
#                                 # (SC_VARIANT: e.g. size=S/4; SC_PARALLEL=1: both at once);
#                                 # FID at 1, 2, 4, 8, 128 steps; 1- and 128-step grids
#   scripts/gpu_runs.sh tarflow   # TarFlow: test bits/dim of a uniform-dequantization run
#                                 # (comparable with published numbers); a Gaussian-noise run
#                                 # (TF_STEPS): FID, grids with and without the denoising
#                                 # step, sequential vs Jacobi and GS-Jacobi inverses at
#                                 # batch 512 and 32 (INVERSE_SEGMENTS, INVERSE_TOLS,
#                                 # INVERSE_NUM), each also against the exact inverse
#   scripts/gpu_runs.sh memorization  # MNIST U-Net on train[:K] for K in $MEM_KS, MEM_STEPS
#                                 # steps each: memorized / spurious / generalized against K
#   scripts/gpu_runs.sh earth     # sphere flow matching on the Earth datasets ($DATASETS, all
#                                 # four by default): EARTH_SECONDS (steps sized by a probe
#                                 # run) each of a EARTH_HIDDEN x EARTH_DEPTH MLP at batch
#                                 # EARTH_BATCH, split seeds EARTH_SEEDS (default 0); test NLL
#                                 # table (mean ± std over seeds; the checkpoint chosen
#                                 # among the newest EARTH_LAST), maps
#   scripts/gpu_runs.sh givt      # GIVT: the MNIST β-VAE, then GIVT k = 8 and k = 1 on its
#                                 # latents, GIVT_SECONDS each (time-boxed); test NLL, FID of
#                                 # NUM_FID samples over temperature x guidance (GIVT_TEMPS,
#                                 # GIVT_CFGS), the VAE's reconstructions; sampling images/s
#                                 # against TarFlow's sequential inverse (bench_sampling)
#
# The GPU machine has no tensorflow-datasets, no network and takes at most 64 MiB per call, so
# data, weights and the missing packages travel as files (about 59 MB, git-ignored), made
# once where ../shared/data is:
#
#   TFDS_DATA_DIR=../shared/data/tfds python -m scripts.export_npz --dataset mnist \
#       --out .devdata/mnist_{split}.npz
#   python -c "import numpy as np; d = np.load('../shared/data/inception/fid_inception_v3_2015-12-05_fp32.npz'); \
#       np.savez('.devdata/inception_fp16.npz', **{k: d[k].astype(np.float16) for k in d.files})"
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#       --platform manylinux2014_x86_64 -d .whl ml_collections==1.1.0 tensorboardX==2.6.5 \
#       diffrax==0.7.2 equinox==0.13.8 jaxtyping==0.3.11 lineax==0.1.1 optimistix==0.1.0 \
#       wadler-lindig==0.1.8
#   mkdir -p .devdata/earth && cp ../shared/data/earth/*.csv .devdata/earth/
#
# Each part writes $RESULTS/<part>/ (default gpu_results/; log.txt, JSON, PNG) and, where $OUT
# is set, packs it into $OUT/<part>.tgz. Training budgets are environment variables in seconds
# (UNET_SECONDS, SC_SECONDS, TF_SECONDS, TF_BPD_SECONDS, EARTH_SECONDS): each run's steps are
# sized from the step rate of a PROBE_STEPS probe run (the cosine schedules follow
# total_steps), unless *_STEPS gives them; the seconds then stay only as a safety net. Parts
# may share the GPU (two processes, XLA_PYTHON_CLIENT_MEM_FRACTION each): the probes then
# measure the shared rate.
#
# What the first session (H100, 2026-11-24, BENCHMARKS.md) taught: every process compiles
# for 35 to 90 s before its first step, and each CLI call is its own process, so a part
# spends minutes outside training (bench alone took over 5.5 minutes; 4 parts fitted 30
# minutes). A 10-minute call holds about one part; the machine goes back 30 s
# after a call, so have the next command ready. BUDGET=<seconds> bounds the whole invocation:
# each part runs under `timeout` with what is left, and one cut short is still packed.
# TINY=1 rehearses every part on a CPU in minutes (smoke-size networks, meaningless numbers).
#
# Since 2026-12 a task that draws a device gets one H100 (or H200) for 15 minutes of device
# time in all (starts, transfers and idle waits counted; at most 10 minutes a call): one full
# call, and whatever start-up is left. The call that closes the most (issue 3's FID timing
# at full float32: TF32 convolutions moved the CPU's FID by 0.14 %, over the 0.1 % allowed;
# then issue 4's shortcut/flow-matching pair), with every file carried:
#
#   BUDGET=560 FID_PRECISIONS="highest tf32x3" SC_PARALLEL=1 SC_VARIANT=size=S/4 \
#       SC_SECONDS=210 NUM_SWEEP=3000 \
#       SC_FLAGS="--config.optim.lr=3e-4 --config.optim.schedule=cosine" \
#       scripts/gpu_runs.sh fid shortcut
#
# (tf32x3: three TF32 products per convolution, float32's accuracy on the tensor cores; its
# effect on FID was measured on the CPU with the GPU's rounding emulated, BENCHMARKS.md.)
#
# The next such lease: `UNET_SECONDS=480 scripts/gpu_runs.sh unet` alone (issue 2's ten
# minutes); then `tarflow` (the exact_* rows on the GPU) and `earth`.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DEVDATA=${DEVDATA:-.devdata}
RESULTS=${RESULTS:-gpu_results}
RUNS=${RUNS:-runs/gpu}
PY=${PY:-python3}
export PYTHONUNBUFFERED=1
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/driftlab-jax-cache}

if ! "$PY" -c "import ml_collections, tensorboardX, diffrax" 2>/dev/null; then  # carried wheels
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/driftlab-site .whl/*.whl
    export PYTHONPATH=/tmp/driftlab-site${PYTHONPATH:+:$PYTHONPATH}
fi

if [ "${TINY:-0}" = 1 ]; then
    BENCH_BATCH=8 BENCH_STEPS=2 SAMPLE_BATCH=8 NUM_FID=16 NUM_SWEEP=16 SWEEP_STEPS=1,2
    # UNET_STEPS or SC_STEPS set empty: the time-boxed or probe-sized runs of a GPU session
    UNET_STEPS=${UNET_STEPS-3} SC_STEPS=${SC_STEPS-3} TF_STEPS=3 NUM_GIVEN=64 INCEPTION_BATCH=16
    INVERSE_NUM=8 INVERSE_BATCH=8 INVERSE_SMALL_BATCH=4 MNIST_BENCH_BATCH=(--batch 8)
    INVERSE_SEGMENTS=${INVERSE_SEGMENTS:-0,7,7/0}  # the smoke flow has 2 blocks
    tiny_data=$RUNS/tiny_data
    mkdir -p "$tiny_data"
    "$PY" -c "
import sys
import numpy as np
src, dst = sys.argv[1:]
for split, n in (('train', 96), ('test', 48)):
    with np.load(f'{src}/mnist_{split}.npz') as f:
        np.savez(f'{dst}/mnist_{split}.npz', arr_0=f['arr_0'][:n], arr_1=f['arr_1'][:n])
" "$DEVDATA" "$tiny_data"
    DATA_PATH="$tiny_data/mnist_{split}.npz"
else
    BENCH_BATCH=256 BENCH_STEPS=50 SAMPLE_BATCH=1000 NUM_FID=10000 NUM_SWEEP=${NUM_SWEEP:-5000}
    SWEEP_STEPS=1,2,4,8,128 NUM_GIVEN=50000 INCEPTION_BATCH=500
    INVERSE_NUM=${INVERSE_NUM:-2048} INVERSE_BATCH=512 INVERSE_SMALL_BATCH=32 MNIST_BENCH_BATCH=()
    DATA_PATH="$DEVDATA/mnist_{split}.npz"
fi
# a training length left unset is sized from a probe run (probe_steps) to fill its *_SECONDS
UNET_STEPS=${UNET_STEPS:-} SC_STEPS=${SC_STEPS:-} TF_STEPS=${TF_STEPS:-}
# EARTH_STEPS unset: sized from a probe run's step rate to last EARTH_SECONDS per dataset
EARTH_STEPS=${EARTH_STEPS:-$([ "${TINY:-0}" = 1 ] && echo 4 || echo)}
EARTH_SECONDS=${EARTH_SECONDS:-90}
# the likelihood's ODE solve: fixed RK4 steps were off by 0.6 (100 steps) and 0.15 (400) nats
# per point on the sharpest Fourier-feature field; adaptive dopri5 at 1e-5 by 0.03 (BENCHMARKS)
NLL_TOL=$([ "${TINY:-0}" = 1 ] && echo 1e-3 || echo 1e-5)  # adaptive dopri5, as the papers
if [ -d "$DEVDATA/earth" ]; then
    export DRIFTLAB_EARTH_DIR=${DRIFTLAB_EARTH_DIR:-$DEVDATA/earth}
fi
if [ -f "$DEVDATA/inception_fp16.npz" ]; then  # the fp32 file does not fit a device call
    export DRIFTLAB_INCEPTION_WEIGHTS=${DRIFTLAB_INCEPTION_WEIGHTS:-$DEVDATA/inception_fp16.npz}
fi
NPZ=(--config.data.name=npz "--config.data.path=$DATA_PATH" --config.data.split=train)
EVAL=(--batch "$SAMPLE_BATCH" --inception-batch "$INCEPTION_BATCH")

spec() {  # the experiment spec; with TINY=1 its smoke size
    if [ "${TINY:-0}" != 1 ]; then
        echo "$1"
    elif [[ $1 == *:* ]]; then
        echo "$1,smoke=True"
    else
        echo "$1:smoke=True"
    fi
}

probe_rate() {  # probe_rate CONFIG [flags]: train steps per second, from a short run
    # the cosine schedules follow total_steps, so a run cut short by its time budget never
    # decays its rate: runs are sized (steps_for) from the step rate of a short run of the
    # same network and batch (on a shared GPU the rate counts the sharing too). A fixed
    # number of steps, not seconds: the first compile took 65 s for the MNIST U-Net on the
    # H100, longer than a time-boxed probe (2026-11-24); the rate is the last logged
    # interval's, compile excluded. The probe's compile is not reused: total_steps is a
    # constant of the compiled step.
    local config probe steps=${PROBE_STEPS:-400}
    config=$(spec "$1")
    probe=$RUNS/probe_$(basename "${1%%.py*}")_$BASHPID  # $$ is shared by subshells
    shift
    rm -rf "$probe"
    "$PY" -m scripts.train --config "$config" --workdir "$probe" --config.total_steps="$steps" \
        --config.log_every=$(( (steps + 3) / 4 )) --config.ckpt_every="$steps" \
        --config.sample_every=0 "$@" >&2
    "$PY" -c "
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if 'steps_per_sec' in line]
if len(rows) < 3:
    sys.exit(f'probe {sys.argv[1]}: fewer than three logged intervals, no compile-free rate')
print(rows[-2]['steps_per_sec'])  # a whole interval after the first (compile); the last one
" "$probe/metrics.jsonl"  # also holds the final checkpoint's save
    rm -rf "$probe"
}

steps_for() {  # steps_for RATE SECONDS: 90 % of the steps that fit, in hundreds (at least 100)
    local n
    n=$(awk -v r="$1" -v s="$2" 'BEGIN { n = int(r * s * 0.9 / 100) * 100; print (n < 100 ? 100 : n) }')
    echo "sized: $1 steps/s x $2 s -> $n steps" >&2
    echo "$n"
}

train() {  # train CONFIG WORKDIR STEPS SECONDS [flags]: STEPS steps on the npz data
    # SECONDS is the time the steps were sized for (steps_for); the run is cut only past
    # 1.5 x SECONDS + 120 s (the compile: 35 to 90 s per network on the H100, 2026-11-24)
    local config workdir=$2 steps=$3 seconds=$4
    config=$(spec "$1")
    shift 4
    "$PY" -m scripts.train --config "$config" --workdir "$workdir" "${NPZ[@]}" \
        --config.total_steps="$steps" --config.train_seconds="$((seconds * 3 / 2 + 120))" \
        --config.ckpt_every="$steps" --config.sample_every="$steps" --config.log_every=100 "$@"
}

part_bench() {
    local out=$1 s
    for s in cifar10_dit.py:size=S/2 cifar10_dit.py:size=B/2 cifar10_unet.py; do
        "$PY" -m scripts.bench --config "experiments/flow_matching/$(spec "$s")" \
            --batch "$BENCH_BATCH" --dtype bfloat16 --steps "$BENCH_STEPS" --out "$out/bench.jsonl"
    done
    # step rates of the MNIST configs at their own batch sizes (to size the runs below)
    for s in flow_matching/mnist_unet.py shortcut/mnist_dit.py:teacher=current \
        shortcut/mnist_dit.py:method=fm nf/mnist_tarflow.py; do
        "$PY" -m scripts.bench --config "experiments/$(spec "$s")" --steps "$BENCH_STEPS" \
            --no-sampling "${MNIST_BENCH_BATCH[@]}" --out "$out/bench_mnist.jsonl"
    done
    part_fid "$out"
}

part_fid() {
    local out=$1 t0 t1 p
    # FID of NUM_GIVEN given images (MNIST train) against cached statistics (MNIST test), end
    # to end: a fresh process that reads the .npz, runs Inception and compares. At each
    # Inception precision of FID_PRECISIONS: "highest" (full float32, as the pytorch-fid
    # agreement was measured), "tf32x3" (three TF32 products per convolution: float32's
    # accuracy from the tensor cores) and "default" (TF32 on the GPU, as PyTorch runs cuDNN
    # convolutions by default); the statistics are written at the same precision
    "$PY" -c "
import sys
import numpy as np
x = np.load(sys.argv[1])['arr_0'][: int(sys.argv[3])]
np.savez(sys.argv[2], arr_0=x)
" "${DATA_PATH/\{split\}/train}" "$RUNS/given.npz" "$NUM_GIVEN"
    for p in ${FID_PRECISIONS:-highest tf32x3 default}; do
        "$PY" -m scripts.evaluate --dataset "$DATA_PATH" --split test --inception-precision "$p" \
            --write-stats "$RUNS/mnist_test_stats_$p.npz" --inception-batch "$INCEPTION_BATCH"
        t0=$(date +%s.%N)
        "$PY" -m scripts.evaluate --samples "$RUNS/given.npz" --inception-precision "$p" \
            --ref-stats "$RUNS/mnist_test_stats_$p.npz" --metrics fid \
            --inception-batch "$INCEPTION_BATCH" --out "$out/fid_given_$p.json"
        t1=$(date +%s.%N)
        "$PY" -c "
import json, sys
n, t0, t1, weights, precision = sys.argv[1:]
print(json.dumps({'num': int(n), 'wall_s': float(t1) - float(t0), 'weights': weights,
                  'inception_precision': precision}))
" "$NUM_GIVEN" "$t0" "$t1" "${DRIFTLAB_INCEPTION_WEIGHTS:-default}" "$p" |
            tee "$out/fid_given_time_$p.json"
    done
}

part_unet() {
    local out=$1 run=$RUNS/mnist_unet config=experiments/flow_matching/mnist_unet.py
    local seconds=${UNET_SECONDS:-420} steps=$UNET_STEPS
    # the config's learning rate is constant after its warm-up, so without UNET_STEPS the run
    # is time-boxed (train_seconds = UNET_SECONDS): no probe, whose 65 s compile (H100,
    # 2026-11-24) would not be reused. EMA 0.999: the config's 0.9999 averages over ~10k
    # steps, too long for a short run
    if [ -n "$steps" ]; then
        train "$config" "$run" "$steps" "$seconds" --config.ema_decay=0.999
    else
        "$PY" -m scripts.train --config "$(spec "$config")" --workdir "$run" "${NPZ[@]}" \
            --config.total_steps=10000000 --config.train_seconds="$seconds" \
            --config.ckpt_every=100000 --config.sample_every=0 --config.log_every=100 \
            --config.ema_decay=0.999
    fi
    "$PY" -m scripts.sample --workdir "$run" --num 64 --out "$RUNS/mnist_unet_samples.npz"
    cp "$RUNS/mnist_unet_samples.png" "$out/mnist_unet_samples.png"
    cp "$run/metrics.jsonl" "$out/mnist_unet_metrics.jsonl"
    "$PY" -m scripts.plot_metrics --workdir "$run" --keys loss,grad_norm --logy \
        --out "$out/mnist_unet_loss.png"
    "$PY" -m scripts.evaluate --workdir "$run" --num "$NUM_FID" --metrics fid "${EVAL[@]}" \
        --out "$out/mnist_unet_fid.json"
}

part_shortcut() {
    local out=$1 sc=$RUNS/mnist_shortcut fm=$RUNS/mnist_fm run k name rate p1 p2
    local config=experiments/shortcut/mnist_dit.py seconds=${SC_SECONDS:-170} steps=$SC_STEPS
    local v=${SC_VARIANT:+$SC_VARIANT,}  # SC_VARIANT: more of the config's variant, e.g. size=S/4
    # SC_PARALLEL=1 trains both at once on the GPU (each for SC_SECONDS): the MNIST DiT at
    # batch 128 leaves the H100 underused (31.7 steps/s for DiT-S/2 alone, 2026-11-24). The
    # probes must see the load the runs will: beside another part's compile they measured
    # 75.7 steps/s, the runs then made 36 and the call's limit cut them (H100, 2026-11-24)
    # the same steps for both, sized by the shortcut step (the dearer one: its bootstrap
    # targets take two extra forward passes on part of the batch)
    if [ -z "$steps" ]; then
        if [ "${SC_PARALLEL:-0}" = 1 ]; then  # both probes at once: the shared rate
            probe_rate "$config:${v}teacher=current" "${NPZ[@]}" >"$RUNS/sc_rate" & p1=$!
            probe_rate "$config:${v}method=fm" "${NPZ[@]}" >/dev/null & p2=$!
            wait "$p1"
            wait "$p2"
            rate=$(cat "$RUNS/sc_rate")
        else
            rate=$(probe_rate "$config:${v}teacher=current" "${NPZ[@]}")
        fi
        steps=$(steps_for "$rate" "$seconds")
    fi
    # teacher=current: on two moons the EMA teacher left k < 16 blurry at a short budget; a
    # twin EMA of 0.99 (teacher=teacher_ema) cost one-step quality on moons and the CPU MNIST run
    # SC_FLAGS: overrides for both runs (e.g. "--config.optim.lr=3e-4
    # --config.optim.schedule=cosine": 2500 steps at the config's constant 1e-4 left both far
    # from trained, H100 2026-11-24)
    if [ "${SC_PARALLEL:-0}" = 1 ]; then
        # shellcheck disable=SC2086
        train "$config:${v}teacher=current" "$sc" "$steps" "$seconds" ${SC_FLAGS:-} & p1=$!
        # shellcheck disable=SC2086
        train "$config:${v}method=fm" "$fm" "$steps" "$seconds" ${SC_FLAGS:-} & p2=$!
        wait "$p1"
        wait "$p2"
    else
        # shellcheck disable=SC2086
        train "$config:${v}teacher=current" "$sc" "$steps" "$seconds" ${SC_FLAGS:-}
        # shellcheck disable=SC2086
        train "$config:${v}method=fm" "$fm" "$steps" "$seconds" ${SC_FLAGS:-}
    fi
    "$PY" -m scripts.steps_sweep --workdirs "$sc,$fm" --steps "$SWEEP_STEPS" --metrics fid \
        --num "$NUM_SWEEP" "${EVAL[@]}" --out "$RUNS/fid_vs_steps"
    cp "$RUNS/fid_vs_steps.json" "$RUNS/fid_vs_steps.png" "$out/"
    for run in "$sc" "$fm"; do
        name=$(basename "$run")
        for k in 1 "${SWEEP_STEPS##*,}"; do
            "$PY" -m scripts.sample --workdir "$run" --num 64 --steps "$k" \
                --out "$RUNS/${name}_k$k.npz"
            cp "$RUNS/${name}_k$k.png" "$out/"
        done
        cp "$run/metrics.jsonl" "$out/${name}_metrics.jsonl"
    done
}

part_tarflow() {
    local out=$1 run=$RUNS/mnist_tarflow bpd=$RUNS/mnist_tarflow_uniform
    local config=experiments/nf/mnist_tarflow.py
    local seconds=${TF_SECONDS:-200} bpd_seconds=${TF_BPD_SECONDS:-140} steps=$TF_STEPS
    local bpd_steps=${TF_BPD_STEPS:-$TF_STEPS} rate
    if [ -z "$steps" ] || [ -z "$bpd_steps" ]; then  # one probe: both runs share the network
        rate=$(probe_rate "$config" "${NPZ[@]}")
        [ -n "$steps" ] || steps=$(steps_for "$rate" "$seconds")
        [ -n "$bpd_steps" ] || bpd_steps=$(steps_for "$rate" "$bpd_seconds")
    fi
    # bits/dim comparable with RealNVP / Glow / FFJORD needs uniform dequantization: its own
    # run (the Gaussian-noise run below is the sampling model: FID, grids, inverses)
    # TF_BPD_FLAGS: overrides for this run (at lr 2e-3 a 7500-step cosine run went NaN near
    # step 1450, H100 2026-11-24; the uniform variant now defaults to 5e-4)
    # shellcheck disable=SC2086
    train "$config:noise=uniform" "$bpd" "$bpd_steps" "$bpd_seconds" ${TF_BPD_FLAGS:-}
    cp "$bpd/metrics.jsonl" "$out/mnist_tarflow_uniform_metrics.jsonl"
    "$PY" -m scripts.evaluate --workdir "$bpd" --metrics bpd --split test "${EVAL[@]}" \
        --out "$out/mnist_tarflow_bpd.json"
    # and of the raw weights: after 4000 steps an EMA without warm-up gave 6.27 test bits/dim
    # while the training loss (raw weights) had ended at 1.82 (H100, 2026-11-24)
    "$PY" -m scripts.evaluate --workdir "$bpd" --metrics bpd --split test "${EVAL[@]}" --raw \
        --out "$out/mnist_tarflow_bpd_raw.json"
    train "$config" "$run" "$steps" "$seconds"
    cp "$run/metrics.jsonl" "$out/mnist_tarflow_metrics.jsonl"
    "$PY" -m scripts.evaluate --workdir "$run" --num "$NUM_FID" --metrics fid "${EVAL[@]}" \
        --out "$out/mnist_tarflow_fid.json"
    "$PY" -m scripts.sample --workdir "$run" --num 64 --out "$RUNS/tarflow_denoised.npz"
    "$PY" -m scripts.sample --workdir "$run" --num 64 --sample-option denoise=false \
        --out "$RUNS/tarflow_raw.npz"
    cp "$RUNS/tarflow_denoised.png" "$RUNS/tarflow_raw.png" "$out/"
    # float32 inverses: in bfloat16 Jacobi's per-pass change stalls at the bf16 step and it
    # runs ~all passes (models/tarflow.py); the weights are the same
    # plain Jacobi and GS-Jacobi segments (all blocks, or only the first inverted, the block
    # plain Jacobi found slowest), at the big batch and at a small one, where a pass of many
    # tokens costs about what a pass of one does
    # INVERSE_PRECISIONS: the matmul precisions to invert at, "default" (TF32 on the GPU)
    # and/or "highest" (full float32). On the CPU with TF32 rounding (scripts.flow_inverse
    # --tf32) Jacobi needed 35 passes per block where float32 needed 12, and the sequential
    # inverse was itself 3 % of pixels off the exact one (BENCHMARKS.md): full float32 may
    # be the faster Jacobi on a GPU, and is the one that agrees with the sequential inverse
    local b p prec segs=${INVERSE_SEGMENTS:-0,7,7/0/0/0}
    for p in ${INVERSE_PRECISIONS:-default highest}; do
        prec=()
        [ "$p" = highest ] && prec=(env JAX_DEFAULT_MATMUL_PRECISION=highest)
        for b in "$INVERSE_BATCH" "$INVERSE_SMALL_BATCH"; do
            "${prec[@]}" "$PY" -m scripts.flow_inverse --workdir "$run" --num "$INVERSE_NUM" \
                --batch "$b" --dtype float32 --tols "${INVERSE_TOLS:-1e-3}" --segments "$segs" \
                --out "$out/mnist_tarflow_inverse_b${b}_$p.json"
        done
    done
    # about 5 % of uint8 pixels differed between every Jacobi variant and the sequential
    # inverse (max |diff| 1.39, H100 2026-11-24) where the CPU float32 runs agree to 0.002 %;
    # every row also reports its distance from the exact inverse (`exact_*`)
}

part_memorization() {
    local out=$1 tiny=()
    [ "${TINY:-0}" = 1 ] && tiny=(--tiny --steps 2 --num 8 --batch 8 --sample-steps 2)
    # the script's defaults: 10k steps per K at batch 128, 1024 samples, EMA 0.999
    "$PY" -m scripts.memorization_sweep --workdir "$RUNS/mem_sweep" --data-path "$DATA_PATH" \
        --ks "${MEM_KS:-4,16,64,256}" ${MEM_STEPS:+--steps "$MEM_STEPS"} "${tiny[@]}" \
        --out "$out/memorization_vs_K"
}

part_givt() {
    local out=$1 vae=$RUNS/givt_vae seconds=${GIVT_SECONDS:-150} k t c tiny=()
    [ "${TINY:-0}" = 1 ] && tiny=(--config.total_steps=2)
    # time-boxed like part_unet: the configs' cosine schedules run over their own steps
    "$PY" -m scripts.train --config "$(spec experiments/givt/mnist_vae.py)" --workdir "$vae" \
        "${NPZ[@]}" --config.train_seconds="$seconds" --config.sample_every=0 "${tiny[@]}"
    "$PY" -m scripts.evaluate --workdir "$vae" --metrics recon --split test --heldout-num 0 \
        "${EVAL[@]}" --out "$out/givt_vae_recon.json"
    for k in 8 1; do
        "$PY" -m scripts.train --config "$(spec "experiments/givt/mnist_givt.py:k=$k")" \
            --workdir "$RUNS/givt_k$k" "${NPZ[@]}" --config.frozen.vae.workdir="$vae" \
            --config.train_seconds="$seconds" --config.sample_every=0 "${tiny[@]}"
        "$PY" -m scripts.evaluate --workdir "$RUNS/givt_k$k" --metrics nll --heldout-num 0 \
            --out "$out/givt_k${k}_nll.json"
    done
    for t in ${GIVT_TEMPS:-1.0 0.9 0.8}; do
        for c in ${GIVT_CFGS:-1.0 1.5 2.0 3.0}; do
            "$PY" -m scripts.evaluate --workdir "$RUNS/givt_k8" --num "$NUM_FID" --metrics fid \
                --cfg "$c" --sample-option "temperature=$t" "${EVAL[@]}" \
                --out "$out/givt_k8_fid_t${t}_cfg${c}.json"
        done
    done
    "$PY" -m scripts.sample --workdir "$RUNS/givt_k8" --num 64 --cfg 2.0 \
        --sample-option temperature=0.9 --out "$out/givt_k8_samples.npz"
    # sampling images/s at batch 256 against TarFlow's sequential inverse (both autoregressive
    # over 49 tokens; the VAE's decoding included): the tarflow part's run where it ran, else
    # a 2-step one (the sequential inverse's work does not depend on the weights)
    local tf=$RUNS/mnist_tarflow
    if [ ! -d "$tf/checkpoints" ]; then
        tf=$RUNS/givt_speed_tarflow
        "$PY" -m scripts.train --config "$(spec experiments/nf/mnist_tarflow.py)" --workdir "$tf" \
            "${NPZ[@]}" --config.total_steps=2 --config.sample_every=0
    fi
    "$PY" -m scripts.bench_sampling --workdir "$RUNS/givt_k8" --workdir "$tf" --batch 256 \
        --cfg 1.0 --out "$out/givt_tarflow_speed.jsonl"
    "$PY" -m scripts.bench_sampling --workdir "$RUNS/givt_k8" --batch 256 --cfg 2.0 \
        --out "$out/givt_tarflow_speed.jsonl"
}

part_earth() {
    local out=$1 d runs=() size=() steps=$EARTH_STEPS probe=$RUNS/earth_probe
    # the CPU preset (:small=True: 256 Fourier features up to each dataset's own largest
    # frequency, chosen on validation NLL) widened to a GPU size between it and the paper's
    if [ "${TINY:-0}" != 1 ]; then
        size=(--config.model.hidden="${EARTH_HIDDEN:-512}" --config.model.depth="${EARTH_DEPTH:-6}"
            --config.batch_size="${EARTH_BATCH:-4096}" --config.optim.lr="${EARTH_LR:-5e-4}"
            ${EARTH_FOURIER_MAX:+--config.model.fourier_max="$EARTH_FOURIER_MAX"})
    fi
    if [ -z "$steps" ]; then  # every dataset shares the network and batch: one probe
        steps=$(steps_for "$(probe_rate experiments/sphere/earth_volcano.py:small=True "${size[@]}")" \
            "$EARTH_SECONDS")
    fi
    for d in ${DATASETS:-volcano earthquake flood fire}; do
        for s in ${EARTH_SEEDS:-0}; do  # split seeds: nll_table pools them (mean ± std)
            # validation NLL picks the checkpoint (nll_table): keep ten along the run
            "$PY" -m scripts.train --config "$(spec "experiments/sphere/earth_$d.py:small=True")" \
                --workdir "$RUNS/earth_${d}_s$s" --config.total_steps="$steps" \
                --config.data.options.seed="$s" \
                --config.train_seconds="$((EARTH_SECONDS * 3 / 2 + 120))" --config.keep_ckpts=10 \
                --config.ckpt_every=$(( (steps + 9) / 10 )) --config.sample_every="$steps" \
                --config.log_every=500 "${size[@]}"
            cp "$RUNS/earth_${d}_s$s/metrics.jsonl" "$out/earth_${d}_s${s}_metrics.jsonl"
            runs+=("$RUNS/earth_${d}_s$s")
        done
    done
    # EARTH_LAST: the validation NLL picks among the newest K checkpoints only (0: all ten)
    "$PY" -m scripts.nll_table --workdirs "$(IFS=,; echo "${runs[*]}")" --nll-tol "$NLL_TOL" \
        --last "${EARTH_LAST:-3}" --out "$out/earth_nll"
}

if [ $# -lt 1 ]; then
    sed -n '2,32p' "$0"
    exit 2
fi
for part in "$@"; do
    if ! declare -F "part_$part" >/dev/null; then
        echo "unknown part '$part'; known: bench, fid, unet, shortcut, tarflow, memorization, earth, givt"
        exit 2
    fi
done
if [ -n "${PART_ONLY:-}" ]; then  # one part, inside the BUDGET's timeout below
    "part_$1" "$RESULTS/$1"
    exit
fi
START=$(date +%s)
for part in "$@"; do
    out=$RESULTS/$part
    rm -rf "$out"
    mkdir -p "$out" "$RUNS"
    set +e
    (
        set -e
        echo "# $part $(date -u +%FT%TZ) $(git rev-parse --short HEAD 2>/dev/null || echo -)"
        "$PY" -c "import importlib.metadata as m, jax; print(jax.devices(), *(f'{p} {m.version(p)}' \
for p in ('jax', 'flax', 'optax', 'orbax-checkpoint', 'numpy')))"
        nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true
        if [ -z "${BUDGET:-}" ]; then
            "part_$part" "$out"
        else  # the seconds left of BUDGET (15 kept to pack): timeout ends the whole part
            left=$((BUDGET - ($(date +%s) - START) - 15))
            [ "$left" -gt 0 ] || { echo "BUDGET=$BUDGET s spent before $part"; exit 124; }
            PART_ONLY=1 BUDGET= timeout "$left" "$0" "$part"
        fi
    ) 2>&1 | tee "$out/log.txt"
    status=${PIPESTATUS[0]}
    set -e
    echo "# $part exit $status" | tee -a "$out/log.txt"
    if [ -n "${OUT:-}" ]; then tar -czf "$OUT/$part.tgz" -C "$RESULTS" "$part"; fi
    # with a BUDGET, a part cut short (124) still leaves what it wrote; go on to the next
    if [ "$status" != 0 ] && { [ -z "${BUDGET:-}" ] || [ "$status" != 124 ]; }; then
        exit "$status"
    fi
    [ "$status" = 0 ] || cut=124
done
exit "${cut:-0}"
