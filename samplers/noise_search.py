"""Inference-time noise search (Ma et al. 2025, arXiv 2501.09732): spend compute at sampling
time on finding better noise, scored by a verifier (higher is better).

Pure and jittable. `generate(noise, cond) -> x` is a family's generation with its parameters
bound (`core.generation.Generation.generate`), `verify(x, cond, noise) -> [B]` a verifier
with its parameters bound (`metrics.verifiers.Verifier`). Every candidate's noise is given
explicitly (leading axes before the batch), so a search is a deterministic function of its
noise; each batch row keeps its own best. A NaN score is never selected (it counts as
-inf), and ties keep the earlier candidate.

- `random_search`: the best of N initial noises `[N, B, ...]`.
- `zero_order_search`: N neighbours of a pivot per round, `neighbour = sqrt(1 - λ²) pivot +
  λ e` with `e ~ N(0, I)` (the same N(0, I) marginal as the pivot, so neighbours stay on the
  prior's typical set; on the sphere prior the mix is projected back to the sphere); the
  best neighbour becomes the pivot when it beats it; R rounds.
- `path_search`: N noises integrated to an intermediate time; each round branches every
  candidate M times by re-noising it back by Δf (`samplers.sde.renoise`) and integrating
  forward by Δb, scores the branches by the verifier on the one-step prediction of the data
  (`x1_hat = x + (1 - t) v`), and keeps the best N; at t = 1 the best candidate.

Each search also returns the running best score after each unit of work (`history`), from
which the NFE curves of the CLI are drawn.
"""

import jax
import jax.numpy as jnp

from samplers.sde import renoise


def _finite(scores: jax.Array) -> jax.Array:
    return jnp.where(jnp.isnan(scores), -jnp.inf, scores)


def _where_rows(take: jax.Array, new, old):
    """Per batch row (`take` `[B]`), `new` where True else `old`, over pytrees."""

    def pick(a, b):
        return jnp.where(take.reshape(take.shape + (1,) * (a.ndim - 1)), a, b)

    return jax.tree.map(pick, new, old)


def _index(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def random_search(generate, verify, candidates, cond):
    """Best of N: `candidates` a noise pytree with leaves `[N, B, ...]` ->
    `(samples [B, ...], noise [B, ...], scores [B], history [N, B])`, `history[n]` the best
    score among the first `n + 1` candidates."""
    first = _index(candidates, 0)
    x = generate(first, cond)
    score = _finite(verify(x, cond, first))

    def body(best, noise):
        bx, bn, bs = best
        cx = generate(noise, cond)
        cs = _finite(verify(cx, cond, noise))
        better = cs > bs
        best = (_where_rows(better, cx, bx), _where_rows(better, noise, bn), jnp.maximum(bs, cs))
        return best, best[2]

    rest = jax.tree.map(lambda a: a[1:], candidates)
    (x, noise, best), history = jax.lax.scan(body, (x, first, score), rest)
    return x, noise, best, jnp.concatenate([score[None], history])


def neighbour(noise, perturbation, radius: float, *, sphere: bool = False):
    """`sqrt(1 - λ²) noise + λ e` leaf by leaf (λ = `radius` in [0, 1]); with `sphere`, the
    initial noise is projected back onto the unit sphere of its last axis."""
    a, b = jnp.sqrt(1.0 - radius**2), radius

    def mix(path, n, e):
        out = a * n + b * e
        if sphere and getattr(path[-1], "key", None) == "x_init":
            out = out / jnp.linalg.norm(out, axis=-1, keepdims=True)
        return out

    return jax.tree_util.tree_map_with_path(mix, noise, perturbation)


def zero_order_search(generate, verify, pivot, perturbations, cond, *, radius, sphere=False):
    """R rounds of N neighbours: `pivot` noise `[B, ...]`, `perturbations` standard normal
    `[R, N, B, ...]` -> `(samples, noise, scores, history [R + 1, B])`, `history[r]` the
    pivot's score after round r (0: the pivot itself). λ = 0 returns the pivot."""
    x = generate(pivot, cond)
    score = _finite(verify(x, cond, pivot))

    def round_(state, round_perturbations):
        def candidate(best, e):
            bx, bn, bs = best
            noise = neighbour(state[1], e, radius, sphere=sphere)
            cx = generate(noise, cond)
            cs = _finite(verify(cx, cond, noise))
            better = cs > bs
            return (_where_rows(better, cx, bx), _where_rows(better, noise, bn),
                    jnp.maximum(bs, cs)), None  # fmt: skip

        state, _ = jax.lax.scan(candidate, state, round_perturbations)
        return state, state[2]

    (x, noise, best), history = jax.lax.scan(round_, (x, pivot, score), perturbations)
    return x, noise, best, jnp.concatenate([score[None], history])


def path_search(
    integrate,
    predict,
    verify,
    x_init,
    branch_noise,
    cond,
    *,
    times: tuple[float, ...],
    delta_f: float,
):
    """Search over paths. `x_init` `[N, B, ...]` initial noises; `times` `(t_0, t_1, ...,
    t_R = 1)` where round r takes the candidates from `t_{r-1}` to `t_r` (`t_0`: reached by
    plain integration from 0); `branch_noise` `[R, N, M, B, ...]` standard normal: candidate
    n's branch m re-noises with it from `t_{r-1}` back to `t_{r-1} - delta_f` and integrates
    to `t_r`. `integrate(x, cond, t_start, t_end) -> x`, `predict(x, cond, t) -> x1_hat`.
    The N best branches by `verify(predict(...))` go on; at `t_R = 1` the best
    candidate by `verify` of the sample itself. Returns `(samples [B, ...], scores [B],
    history [R + 1, B])`, `history[r]` the best score after round r (0: the initial paths
    at `t_0`, scored by their prediction)."""
    n = x_init.shape[0]
    x = jax.vmap(lambda x: integrate(x, cond, 0.0, times[0]))(x_init)
    predicted = jax.vmap(lambda y: _finite(verify(predict(y, cond, times[0]), cond, None)))
    history = [jnp.max(predicted(x), axis=0)]
    for r in range(1, len(times)):
        t, t_next = times[r - 1], times[r]
        back = max(t - delta_f, 0.0)
        eps = branch_noise[r - 1]  # [N, M, B, ...]

        def branch(xn, en, t=t, back=back, t_next=t_next):
            def one(e):
                return integrate(renoise(xn, t, back, e), cond, back, t_next)

            return jax.vmap(one)(en)  # [M, B, ...]

        branches = jax.vmap(branch)(x, eps)  # [N, M, B, ...]
        flat = branches.reshape((-1,) + branches.shape[2:])  # [N*M, B, ...]
        last = r == len(times) - 1
        # the last round scores the samples themselves, the others their prediction
        judged = flat if last else jax.vmap(lambda y, t=t_next: predict(y, cond, t))(flat)
        scores = jax.vmap(lambda y: _finite(verify(y, cond, None)))(judged)  # [N*M, B]
        order = jnp.argsort(-scores, axis=0, stable=True)[: (1 if last else n)]  # [k, B]
        x = jnp.take_along_axis(flat, order.reshape(order.shape + (1,) * (flat.ndim - 2)), 0)
        history.append(jnp.take_along_axis(scores, order[:1], 0)[0])
    if len(times) == 1:  # no rounds: the best of the plain paths by their samples
        scores = jax.vmap(lambda y: _finite(verify(y, cond, None)))(x)
        best = jnp.argmax(scores, axis=0)
        x = jnp.take_along_axis(x, best.reshape((1,) + best.shape + (1,) * (x.ndim - 2)), 0)
        history[-1] = jnp.max(scores, axis=0)
    return x[0], history[-1], jnp.stack(history)
