r"""Shortcut model (Frans et al. 2024) on MNIST (28×28×1) with DiT-S/2: one network that
samples in 1, 2, 4, ..., 128 steps.

  TFDS_DATA_DIR=../shared/data/tfds python -m scripts.train \
      --config experiments/shortcut/mnist_dit.py --workdir runs/mnist_shortcut

One GPU. Sample grids use one step; any power of two up to `loss.max_steps` works
(`--config.sample.num_steps=4`; `loss.max_steps` and `sample.options.max_steps` are one
value). Variants: `:size=S/4` (or B/2 ...); `:method=fm` (the flow-matching baseline: the
same DiT without the `dt` input, same data, batch, optimizer, EMA and uniform time
sampling, sampled with k Euler steps; compare with `scripts.steps_sweep`); `:teacher=current`
(bootstrap targets from the current parameters instead of the EMA: on two moons the EMA
teacher left k < 16 steps blurry after 5k steps, see BENCHMARKS.md); `:teacher=teacher_ema`
(iSM's twin EMA: a second EMA of decay `teacher_ema_decay`, 0.99, is the teacher, the 0.999
EMA stays the sampling weights); `:cond=True`
(class-conditional with label dropout and, as in the paper, guidance 1.5 inside the
bootstrap targets: k < 128 steps are guided by training and sample with cfg_scale 1, while
128 steps are the plain flow-matching velocity and take `cfg_scale=1.5` at sampling).
`:cpu=True` is a DiT small enough to train on two CPU cores (width 128, depth 4, 4 heads,
patch 4: 1.3 M parameters, 83 MFLOP per forward pass; about 0.45 s per float32 step at
batch 128 on the 2-core development machine), float32, for the CPU comparison in
BENCHMARKS.md. `:smoke=True` is the CPU test size (batch 8, max_steps 8). After 20,000 CPU
steps of `:cpu=True,teacher=current` (lr 3e-4, cosine) the shortcut model's FID (1000
samples) was 107.6 at 1 step and 49.0 at 128, flow matching's 301.5 and 57.0
(BENCHMARKS.md); twice the self-consistency rows (`--config.loss.bootstrap_every=4`) left the
1-step FID unchanged at steps 8000 and 14000 and the 128-step one worse; the twin EMA
(`:teacher=teacher_ema`) made the 1-step FID worse at both (149.3 and 123.6 against 136.5
and 112.8). The GPU runs of DiT-S/2 so far are short.
"""

from core.config import base_config, parse_variant
from experiments.presets import dit, make_conditional, shortcut_or_flow_matching, shrink_for_smoke


def get_config(arg: str | None = None):
    v = parse_variant(
        arg, size="S/2", method="shortcut", teacher="ema", cond=False, cpu=False, smoke=False
    )
    c = base_config()
    c.total_steps = 50_000
    c.batch_size = 128  # 16 self-consistency rows: 2+ for each of the 7 bootstrap levels
    c.log_every = 100
    c.ckpt_every = 5_000
    c.sample_every = 5_000
    c.ema_decay = 0.999  # the EMA is the bootstrap teacher: it must follow the net closely
    c.compute_dtype = "bfloat16"
    c.optim.update(lr=1e-4, warmup_steps=1_000)
    c.data.update(name="mnist", split="train")
    c.model = dit(1, v.size)
    if v.cpu:
        c.model.update(hidden=128, depth=4, heads=4, patch=4)
        c.compute_dtype = "float32"  # bfloat16 is emulated, slowly, on a CPU
    shortcut_or_flow_matching(c, v.method, teacher=v.teacher)
    c.sample.num = 64
    if v.cond:
        make_conditional(c, num_classes=10)
    if v.smoke:
        shrink_for_smoke(c)
    return c
