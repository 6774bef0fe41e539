r"""Speed and agreement of a trained flow's inverses: sequential (KV cache) against Jacobi.

  python -m scripts.flow_inverse --workdir runs/mnist_tarflow --num 2048 --batch 512 \
      --tols 1e-3,1e-4,1e-5 --segments 0,7,7/0/0/0 --out docs/tarflow_inverse.json

`--segments`: the Jacobi segment sizes to try, each with every tolerance (GS-Jacobi: the
tokens cut into segments solved one after another, Jacobi within each; 0 is one segment,
plain Jacobi); `a/b/c/d` gives one size per block in the order the blocks are inverted (the
order of `passes_per_block`), e.g. segments only for the blocks that plain Jacobi finds
slow, as GS-Jacobi's convergence ranking picks them.

Draws `--num` latents `z ~ N(0, τ² I)` (τ and guidance from the run's sampler options by
`samplers.tarflow.inverse_setup`, as the sampler takes them; labels cycled as the run's
sampler draws them; `--cfg` overrides the guidance weight) and inverts every batch with
each method, the program compiled once per method (the compile is not timed). For each it
reports images/s of the inverse alone (the Tweedie step costs the same after either), the
mean Jacobi passes per block (T - 1 decode steps for the sequential scan), and how far its
images are from the sequential ones on the same latents: max and mean |Δx| on the [-1, 1]
scale and the fraction of 8-bit pixels that differ. Identical 8-bit images give identical
FID, so the last number bounds what the speed-up costs in quality.

Both inverses round: in the compute dtype, and on GPUs also in the default matmul
precision (TF32 on NVIDIA). So every method, the sequential one too, is also compared with
the exact inverse (`exact_*` keys): the sequential inverse of the same weights in float32 at
`jax.default_matmul_precision("highest")`. When Jacobi's distance from the sequential
inverse is about the sequential inverse's own distance from the exact one, the two differ
by rounding, not by the early stop. (On the CPU, a small MNIST TarFlow: Jacobi at tol 1e-3
and the sequential inverse in bfloat16 differed in 21 % of 8-bit pixels, in float32 in
0.002 %; BENCHMARKS.md.) `--tf32` runs every method with the operands of each float32 matmul
rounded to TF32 (`core.precision.tf32_matmuls`; the exact inverse stays full float32): on a
CPU, what the GPU's default precision does to the inverses.

`--dtype` is the network's compute dtype for both inverses (default: the run's
`compute_dtype`; the weights are the same, the graph is rebuilt in that dtype before the
checkpoint is restored) and is recorded in the JSON. In bfloat16 the Jacobi iterates and
`max |Δx|` are float32, but the network rounds its input and affine parameters to 8
significant bits, so the per-pass change stalls at about one bfloat16 step and a smaller
tolerance runs many more passes (often near T) for no gain: bfloat16 Jacobi and sequential
images agree only to ~1e-3 at any tolerance (`models/tarflow.py`). Compare `--dtype
float32` for the early stop, or pass tolerances of that size.
Tolerances must be > 0, `--max-iters` >= 1 and segment sizes >= 0 (one UserError).
"""

import argparse
import json
import time

from scripts.common import argument_parser, run

NAMES = ("method", "--tols", "--max-iters", "--segments")  # for check_inverse_args


def parse(argv: list[str]) -> argparse.Namespace:
    p = argument_parser("flow_inverse", __doc__)
    p.add_argument("--workdir", required=True, help="run directory of a flow (TarFlow)")
    p.add_argument("--num", type=int, default=2048, help="latents inverted by every method")
    p.add_argument("--batch", type=int, default=512, help="latents per device call")
    p.add_argument("--tols", default="1e-3,1e-4,1e-5", help="Jacobi tolerances, comma list")
    p.add_argument("--max-iters", type=int, default=None, help="Jacobi passes per segment cap")
    p.add_argument(
        "--segments",
        default="0",
        help="Jacobi segment sizes, comma list (0: whole; a/b: per block)",
    )
    p.add_argument("--cfg", type=float, default=None, help="guidance weight (default: config)")
    p.add_argument(
        "--dtype", default=None, help="compute dtype, float32 or bfloat16 (default: the run's)"
    )
    p.add_argument(
        "--tf32", action="store_true",
        help="round the operands of every float32 matmul to TF32 (the GPU's default) in "
        "every method but the exact inverse, on any backend",
    )  # fmt: skip
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    p.add_argument("--raw", action="store_true", help="raw weights instead of EMA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the JSON here too")
    return p.parse_args(argv[1:])


def parse_segments(text: str) -> dict:
    """`"0,7,7/0"` -> `{"0": 0, "7": 7, "7/0": (7, 0)}` (labels to `segment` values);
    anything else than integers is one UserError (their range is checked with the rest)."""
    from core.errors import UserError

    out = {}
    for entry in (e.strip() for e in text.split(",") if e.strip()):
        try:
            sizes = tuple(int(v) for v in entry.split("/"))
        except ValueError:
            raise UserError(
                f"--segments={text!r}: {entry!r} is not an integer or a/b/... of integers"
            ) from None
        out[entry] = sizes if len(sizes) > 1 else sizes[0]
    if not out:
        raise UserError(f"--segments={text!r} names no segment size")
    return out


def compare(x, reference) -> dict:
    """How far images `x` are from `reference` (both float in [-1, 1])."""
    import numpy as np

    from core.plots import to_uint8

    diff = np.abs(x - reference)
    return {
        "max_abs_diff": float(diff.max()),
        "mean_abs_diff": float(diff.mean()),
        "uint8_pixels_differing": float(np.mean(to_uint8(x) != to_uint8(reference))),
    }


def main(argv: list[str]) -> None:
    args = parse(argv)
    import contextlib

    import jax
    import numpy as np
    from flax import nnx

    from core import precision, runs, sampling, sharding
    from core.errors import UserError
    from core.experiment import sample_labels
    from models.tarflow import TarFlow, check_inverse_args
    from samplers.tarflow import inverse_setup

    try:
        tols = [float(t) for t in args.tols.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"--tols={args.tols!r} is not a comma list of numbers") from None
    segments = parse_segments(args.segments)
    for tol in tols:
        for segment in segments.values():
            check_inverse_args("jacobi", tol, args.max_iters, segment, names=NAMES, zero_tol=False)
    run_experiment, spec = runs.load_run(args.workdir)
    network = run_experiment.network
    if args.dtype is not None:  # before restore_network builds the graph
        network = network.with_dtype(args.dtype)  # a UserError for an unknown dtype
    run_experiment = run_experiment.but(network=network)
    dtype = network.dtype
    mesh = sharding.make_mesh()
    graphdef, params, step = runs.restore_network(
        args.workdir, run_experiment, mesh, step=args.step, ema=not args.raw
    )
    flow = nnx.merge(graphdef, params)
    if not isinstance(flow, TarFlow):
        raise UserError(f"model {network.name!r} has no Jacobi inverse (TarFlow has one)")
    for label, segment in segments.items():
        if isinstance(segment, tuple) and len(segment) != len(flow.blocks):
            raise UserError(
                f"--segments: {label!r} gives {len(segment)} sizes for a flow of "
                f"{len(flow.blocks)} blocks"
            )
    drawing = run_experiment.with_sampling(cfg_scale=args.cfg).sampling
    options = drawing.options
    conditioning = run_experiment.conditioning
    null = conditioning.null if conditioning.conditional else None
    # the run's latent scale and guidance; the inverse method is what this script varies
    drawn = {k: options[k] for k in ("temperature", "guidance_anneal") if k in options}
    temperature, guide = inverse_setup(
        conditional=null is not None, cfg_scale=drawing.cfg_scale, null_cond=null, **drawn
    )
    temperature = float(temperature)
    batch = sharding.sample_batch(mesh, args.batch, args.num)
    n_batches = -(-args.num // batch)
    data = sharding.batch_sharding(mesh)
    shape = (batch, *spec["example_shape"])
    keys = [jax.random.fold_in(jax.random.key(args.seed), i) for i in range(n_batches)]
    zs = [jax.device_put(temperature * jax.random.normal(k, shape), data) for k in keys]
    conds = [
        jax.device_put(sample_labels(batch, spec["num_classes"], i * batch), data)
        for i in range(n_batches)
    ]

    def inverter(**method):
        def fn(params, z, cond):
            net = nnx.merge(graphdef, params)
            c = cond if null is not None else None
            return net.inverse(z, cond=c, return_iters=True, **guide, **method)

        return jax.jit(fn, out_shardings=(data, sharding.replicated(mesh)))

    def timed(fn):
        jax.block_until_ready(fn(params, zs[0], conds[0]))  # compile
        t0 = time.perf_counter()
        outs = [fn(params, z, c) for z, c in zip(zs, conds)]
        jax.block_until_ready(outs)
        seconds = time.perf_counter() - t0
        x = np.concatenate([sampling.to_host(o[0]) for o in outs])[: args.num]
        iters = np.mean([np.asarray(jax.device_get(o[1]), np.float64) for o in outs], axis=0)
        return x, seconds, iters

    def exact_images():
        """The sequential inverse of the same weights in float32 at full matmul precision
        (the graph rebuilt in float32; the restored parameters, cast to float32 in case the
        config stores them in a narrower `param_dtype`)."""
        graph32, _ = network.with_dtype("float32").abstract()
        params32 = jax.tree.map(lambda a: a.astype("float32"), params)

        def fn(params, z, cond):
            c = cond if null is not None else None
            return nnx.merge(graph32, params).inverse(z, cond=c, **guide)

        with jax.default_matmul_precision("highest"):
            fn = jax.jit(fn, out_shardings=data)
            outs = [sampling.to_host(fn(params32, z, c)) for z, c in zip(zs, conds)]
        return np.concatenate(outs)[: args.num]

    exact = exact_images()
    methods = [("sequential", {})] + [
        (
            f"jacobi_tol{t:g}" + (f"_seg{label}" if segment else ""),
            dict(method="jacobi", tol=t, max_iters=args.max_iters, segment=segment),
        )
        for label, segment in segments.items()
        for t in tols
    ]
    results, reference = {}, None
    for name, method in methods:
        with precision.tf32_matmuls() if args.tf32 else contextlib.nullcontext():
            x, seconds, iters = timed(inverter(**method))
        if not np.isfinite(x).all():
            raise UserError(f"{name} inverse gave non-finite images")
        row = {
            "images_per_sec": n_batches * batch / seconds,
            "seconds": seconds,
            "passes_per_block": [float(i) for i in iters],
            "mean_passes_per_block": float(np.mean(iters)),
        }
        if method:  # a tuple segment is a JSON list
            row.update(tol=method["tol"], segment=method["segment"])
        row.update({f"exact_{k}": v for k, v in compare(x, exact).items()})
        if reference is None:
            reference = x
        else:
            row.update(compare(x, reference))
            row["speedup"] = row["images_per_sec"] / results["sequential"]["images_per_sec"]
        results[name] = row
        print(name, json.dumps(row))
    out = {
        "workdir": args.workdir,
        "step": int(step),
        "num": n_batches * batch,
        "batch": batch,
        "cfg_scale": drawing.cfg_scale,
        "temperature": temperature,
        "dtype": jax.numpy.dtype(dtype).name,
        "tf32_emulated": bool(args.tf32),
        "exact": "sequential, float32, default_matmul_precision highest",
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "methods": results,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    run(main)
