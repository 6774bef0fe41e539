"""Network presets and the smoke shrink shared by the experiment configs."""

from ml_collections import ConfigDict, FieldReference

from data import EARTH, TOYS

NOT_TFDS = (*TOYS, *EARTH, "npz", "vmf_mixture", "earth_geoloc", "linear_blocks")

# DDPM / ADM-style U-Nets.
UNET_MNIST = dict(
    name="unet",
    in_channels=1,
    image_size=28,
    ch=64,
    ch_mult=(1, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(14,),
    head_dim=64,
)
UNET_CIFAR = dict(
    name="unet",
    in_channels=3,
    image_size=32,
    ch=128,
    ch_mult=(1, 2, 2, 2),
    num_res_blocks=2,
    attn_resolutions=(16,),
    head_dim=64,
)
UNET_SMOKE = dict(ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), head_dim=16)
DIT_SMOKE = dict(hidden=32, depth=1, heads=2)


def dit(in_channels: int, variant: str) -> dict:
    return dict(name="dit", in_channels=in_channels, variant=variant)


def image_net(net: str, dataset: str, in_channels: int, dit_variant: str) -> dict:
    """The U-Net preset of `dataset` or a DiT of `dit_variant`."""
    if net == "unet":
        return dict(UNET_MNIST if dataset == "mnist" else UNET_CIFAR)
    if net == "dit":
        return dit(in_channels, dit_variant)
    from core.errors import UserError

    raise UserError(f"unknown net {net!r}; known: unet, dit")


def make_conditional(
    c: ConfigDict, num_classes: int, drop_prob: float = 0.1, cfg_scale: float = 1.5
) -> None:
    """Class-conditional training with label dropout (for classifier-free guidance)."""
    c.data.use_labels = True
    c.model.num_classes = num_classes
    c.loss.cond_drop_prob = drop_prob
    c.loss.null_cond = num_classes
    c.sample.cfg_scale = cfg_scale
    if c.loss.name == "shortcut":  # guidance inside the bootstrap targets, as the paper:
        # k < max_steps steps are guided by training; max_steps steps (the plain
        # flow-matching velocity) take `cfg_scale` at sampling
        c.loss.bootstrap_cfg_scale, c.sample.cfg_scale = cfg_scale, 1.0


def shortcut(
    c: ConfigDict,
    *,
    teacher: str = "ema",
    target_clip: float | None = 4.0,
    max_steps: int = 128,
    bootstrap_every: int = 8,
    teacher_ema_decay: float = 0.99,
) -> None:
    """Shortcut-model training (Frans et al. 2024) and one-step sample grids. The loss and
    the sampler share `max_steps` (one FieldReference: it fixes the `dt` mapping).
    `teacher="teacher_ema"` also keeps the teacher EMA, with `teacher_ema_decay`."""
    steps = FieldReference(max_steps)
    c.loss = dict(
        name="shortcut",
        bootstrap_every=bootstrap_every,
        max_steps=steps,
        teacher=teacher,
        bootstrap_cfg_scale=1.0,
        target_clip=target_clip,
        time_sampling="uniform",
    )
    c.sample.update(sampler="shortcut", num_steps=1, options=dict(max_steps=steps))
    if teacher == "teacher_ema":
        c.teacher_ema_decay = teacher_ema_decay


def shortcut_or_flow_matching(c: ConfigDict, method: str, **shortcut_kw) -> None:
    """`method="shortcut"`: `shortcut(c, **shortcut_kw)`; `"fm"`: its flow-matching baseline
    with everything else equal (uniform t, k Euler steps, the network without a `dt` input).
    Set `c.model` first: this sets its `use_dt`."""
    if method not in ("shortcut", "fm"):
        from core.errors import UserError

        raise UserError(f"unknown method {method!r}; known: shortcut, fm")
    c.model.use_dt = method == "shortcut"
    if method == "shortcut":
        shortcut(c, **shortcut_kw)
    else:
        c.loss = dict(name="flow_matching", time_sampling="uniform")
        c.sample.update(sampler="euler", num_steps=1)


def shrink_for_smoke(c: ConfigDict) -> None:
    """A CPU-sized run of the same experiment: tiny network, 2 steps, small batch."""
    c.total_steps = 2
    c.batch_size = 8
    c.log_every = 1
    c.ckpt_every = 2
    c.sample_every = 0
    c.optim.warmup_steps = 1
    c.sample.num = 8
    c.sample.num_steps = 2
    if c.data.name not in NOT_TFDS:
        c.data.split = f"{c.data.split}[:64]"
        c.data.options.in_memory = True
    name = c.model.name
    if name == "unet":
        c.model.update(UNET_SMOKE)
    elif name == "dit":
        c.model.update(DIT_SMOKE)
    elif name == "mlp":
        c.model.update(hidden=32, depth=2)
    if c.loss.name == "shortcut":
        c.compute_dtype = "float32"
        c.loss.update(max_steps=8, bootstrap_every=2)  # batch 8: 4 rows for 3 levels


# Riemannian flow matching on the Earth datasets (Chen & Lipman 2023, arXiv 2302.03660):
# their per-dataset MLP width/depth, batch, lr and weight decay (facebookresearch/
# riemannian-fm, configs/experiment/<name>.yaml), EMA 0.999, cosine schedule.
EARTH_PAPER = {
    "volcano": dict(hidden=2048, depth=12, batch_size=8192, lr=2e-4, weight_decay=0.01),
    "earthquake": dict(hidden=2048, depth=10, batch_size=8192, lr=1e-4, weight_decay=1e-3),
    "flood": dict(hidden=2048, depth=7, batch_size=16384, lr=1e-4, weight_decay=0.01),
    "fire": dict(hidden=2048, depth=10, batch_size=8192, lr=5e-4, weight_decay=0.01),
}
# the CPU size: Fourier features of the position (models/sphere.py) let a 256-wide net
# resolve the tight clusters of the data (volcano test NLL -2.5 without them after 10000
# steps, -5.1 with 128 features up to 512 rad^-1 after 6000; BENCHMARKS.md)
EARTH_SMALL = dict(
    hidden=256, depth=4, batch_size=512, lr=1e-3, weight_decay=0.0, fourier_features=256,
)  # fmt: skip
# ... and their largest frequency (rad^-1) per dataset, chosen on validation NLL at 32000
# steps among 8 .. 2048 (BENCHMARKS.md): volcano's test events repeat training places and
# reward sharp peaks; flood's and earthquake's lie tens of km from any training event and
# reward a smoother field (flood: val 0.41 at 32, 0.56 at 512)
EARTH_SMALL_FOURIER_MAX = {"volcano": 512.0, "earthquake": 128.0, "flood": 32.0, "fire": 512.0}


def earth_config(dataset: str, arg: str | None) -> ConfigDict:
    """Flow matching on the sphere S² for one Earth event dataset."""
    from core.config import base_config, parse_variant

    v = parse_variant(arg, small=False, steps=100_000, smoke=False)
    if v.small:
        h = dict(EARTH_SMALL, fourier_max=EARTH_SMALL_FOURIER_MAX[dataset])
    else:
        h = dict(EARTH_PAPER[dataset])
    c = base_config()
    c.total_steps = v.steps
    c.batch_size = h["batch_size"]
    c.log_every = 500
    c.ckpt_every = 10_000
    c.sample_every = 10_000
    c.ema_decay = 0.999
    c.optim.update(
        lr=h["lr"],
        weight_decay=h["weight_decay"],
        warmup_steps=1_000,
        schedule="cosine",
        grad_clip=0.0,
    )
    c.data.update(name=dataset, split="train")
    # the seed of the 80/10/10 split (data/earth.py): --config.data.options.seed=N
    c.data.options = dict(seed=0)
    # the paper's sizes list no Fourier features: the network's defaults (none) apply
    net_keys = ("hidden", "depth", "fourier_features", "fourier_max")
    c.model = dict(name="sphere_mlp", dim=3, **{k: h[k] for k in net_keys if k in h})
    c.loss = dict(name="sphere_fm")
    c.sample.update(
        sampler="sphere_rk4", num_steps=100, num=4096, prior="sphere_uniform", plot="world_map"
    )
    if v.smoke:
        shrink_for_smoke(c)
        c.model.update(hidden=32, depth=2)
    return c
