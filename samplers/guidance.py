"""Classifier-free guidance: the weight schedules, the stateless network wrapper every
sampler gets, and the dynamic switch the ODE samplers carry through their scan.

`v = v_null + w · (v_cond - v_null)`: `w = 1` is the plain conditional model, `w = 0` the
unconditional one, `w > 1` guides. One network call on the doubled batch per evaluation.
`Guidance(scale, schedule, interval, drop)` is the typed setting (`sample.guidance` in a
config); its schedules, in this codebase's time (t = 0 noise, t = 1 data), are:

- `constant`: `w(t) = w`.
- `interval`: `w` for `t` in `[t_lo, t_hi]`, else 1 (guidance in a limited interval,
  Kynkäänniemi et al. 2024).
- `linear`: `w(t) = 1 + 2 (w - 1) t`, rising from 1 at noise, with the same mean as `w`
  over [0, 1] (the increasing linear schedule of Wang et al. 2024, "Analysis of
  Classifier-Free Guidance Weight Schedulers").
- `dynamic`: per sample, `w = 1` until the trajectory leaves the attraction basin, then
  `w` (for `t` in the interval; Jain et al. 2025, arXiv 2411.16738, "Classifier-free
  guidance inside the attraction basin may cause memorization"). The rule, on the gap
  `g_k = ||v_cond(x_k, t_k) - v_null(x_k, t_k)||_2` (over all of a sample's coordinates)
  at the first network evaluation of sampling step k:

      switch on at the first step k >= 1 with  g_k < (1 - drop) · max_{j < k} g_j,

  i.e. once the gap has passed its running maximum and fallen a relative `drop` below it;
  guidance then stays on to the end (the step where the rule fires is already guided).
  With `drop = 0` this is the first step at which the gap shrinks below an earlier value;
  `drop` (default 0.05) is the rule's only smoothing: a relative threshold, so that a
  gap that wobbles on a plateau does not switch. No EMA and no minimum time: along a
  deterministic ODE path the gap is a smooth function of t. The paper's released code
  (SD, noise predictions, one sample per batch) switches later, at the first local
  minimum of the gap (`g_{k-2} > g_{k-1} < g_k`: after the drop has ended); the rule here
  switches when the drop begins, as issue 32 asks, and is exact per sample in a batch.

The time schedules wrap the network (`guide`), so every sampler gets them. The dynamic
switch needs state carried across steps (`Carried`: the flag, the running maximum); the
ODE samplers (`samplers.ode`, euler/midpoint/heun/rk4) carry it through their
`lax.scan`, and other samplers reject it (`CARRIED_SAMPLERS`). A `Carried` network also
serves the diagnostic mode of the ODE samplers (`trace=True`): the gap and the weight at
every step and the switch step per sample, for every schedule.
"""

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from core.errors import UserError
from models.conditioning import null_like

SCHEDULES = ("constant", "interval", "linear", "dynamic")
# the samplers that carry the dynamic switch (and the diagnostic trace) through their scan
CARRIED_SAMPLERS = ("euler", "midpoint", "heun", "rk4")
DEFAULT_DROP = 0.05


@dataclasses.dataclass(frozen=True)
class Guidance:
    """A guidance weight `scale` on the schedule `schedule`; `interval` `(t_lo, t_hi)` is
    where `interval` and `dynamic` may guide; `drop` is the dynamic switch's relative drop.
    Checked on construction: anything malformed is one UserError."""

    scale: float = 1.0
    schedule: str = "constant"
    interval: tuple[float, float] = (0.0, 1.0)
    drop: float = DEFAULT_DROP

    def __post_init__(self):
        if self.schedule not in SCHEDULES:
            raise UserError(
                f"unknown guidance schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}"
            )
        object.__setattr__(self, "scale", float(self.scale))
        object.__setattr__(self, "interval", parse_interval(self.interval))
        object.__setattr__(self, "drop", float(self.drop))
        if self.interval != (0.0, 1.0) and self.schedule not in ("interval", "dynamic"):
            raise UserError(
                f"a guidance interval {self.interval} is used by the schedules interval and "
                f"dynamic, not {self.schedule!r}: drop --cfg-interval / sample.guidance.interval "
                "or set the schedule"
            )
        if not 0.0 <= self.drop < 1.0:
            raise UserError(f"guidance drop={self.drop:g} must be in [0, 1)")

    @property
    def guides(self) -> bool:
        """Whether any weight differs from 1 (else sampling is the plain conditional model)."""
        return self.scale != 1.0

    @property
    def carried(self) -> bool:
        """Whether the weight needs state carried across steps (the dynamic switch)."""
        return self.schedule == "dynamic"

    def weight(self, t: jax.Array, on: jax.Array | None = None) -> jax.Array:
        """`w` at times `t` (per sample); `on`: the dynamic switch's flags."""
        lo, hi = self.interval
        inside = (t >= lo) & (t <= hi)
        if self.schedule == "constant":
            return jnp.full_like(t, self.scale)
        if self.schedule == "interval":
            return jnp.where(inside, self.scale, 1.0).astype(t.dtype)
        if self.schedule == "linear":
            return 1.0 + 2.0 * (self.scale - 1.0) * t
        if on is None:
            raise ValueError("the dynamic schedule's weight needs the switch flags `on`")
        return jnp.where(on & inside, self.scale, 1.0).astype(t.dtype)

    def record(self) -> dict:
        return {"schedule": self.schedule, "scale": self.scale,
                "interval": list(self.interval), "drop": self.drop}  # fmt: skip


def parse_interval(value) -> tuple[float, float]:
    """`(lo, hi)` from a pair or a string `"lo,hi"`, with 0 <= lo <= hi <= 1; else one
    UserError."""
    text = value if isinstance(value, str) else None
    if text is not None:
        value = [v for v in text.replace("(", "").replace(")", "").split(",") if v.strip()]
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise UserError(
            f"a guidance interval is two times lo,hi in [0, 1] (e.g. 0.4,1.0), got {value!r}"
        ) from None
    if not 0.0 <= lo <= hi <= 1.0:
        raise UserError(
            f"guidance interval {lo:g},{hi:g} must have 0 <= lo <= hi <= 1 (t = 0 noise, "
            "t = 1 data)"
        )
    return (lo, hi)


def guidance_schedule(
    name: str, scale: float, *, t_lo: float = 0.0, t_hi: float = 1.0
) -> Callable[[jax.Array], jax.Array]:
    """`w(t)` of a time schedule (constant, interval, linear)."""
    g = Guidance(scale, name, (t_lo, t_hi))
    if g.carried:
        raise UserError("the dynamic schedule has no w(t): it carries a per-sample switch")
    return g.weight


def _both(net, x, t, cond, dt, null_cond):
    """`(v_cond, v_null)` from one call on the doubled batch."""
    double = lambda a: None if a is None else jnp.concatenate([a, a])
    both = net(
        double(x), double(t), cond=jnp.concatenate([cond, null_like(cond, null_cond)]),
        dt=double(dt),
    )  # fmt: skip
    return jnp.split(both, 2)


def _mix(v_cond, v_null, w):
    """`v_null + w (v_cond - v_null)`, exactly `v_cond` where `w = 1`."""
    w = w.reshape(w.shape + (1,) * (v_cond.ndim - 1)).astype(v_cond.dtype)
    return jnp.where(w == 1, v_cond, v_null + w * (v_cond - v_null))


def guide(net, scale, null_cond: int):
    """Wrap `net(x, t, *, cond, dt)` with classifier-free guidance: `scale` is a number, a
    schedule `w(t)` or a `Guidance` of a time schedule (the dynamic one is `Carried`)."""
    if isinstance(scale, Guidance):
        if scale.carried:
            raise UserError(
                "the dynamic guidance schedule carries a per-sample switch through the "
                f"sampler's loop; the samplers that do: {', '.join(CARRIED_SAMPLERS)}"
            )
        if not scale.guides:
            return net
        scale = scale.weight
    if not callable(scale) and float(scale) == 1.0:
        return net

    def guided(x, t, *, cond=None, dt=None):
        if cond is None:
            return net(x, t, cond=None, dt=dt)
        v_cond, v_null = _both(net, x, t, cond, dt, null_cond)
        return _mix(v_cond, v_null, scale(t) if callable(scale) else jnp.full_like(t, scale))

    return guided


class Carried:
    """Guidance with state carried through a sampler's scan: the dynamic switch, and the
    diagnostic trace of any schedule. The sampler calls, per step,

    - `state = init(batch)` once;
    - `v, state, info = begin(state, x, t, cond)` at the step's first evaluation `(x_k,
      t_k)`: both predictions, the gap, the switch updated, the guided velocity;
    - `velocity(state, x, t, cond)` at the step's later stages, with the step's switch.

    `info` holds the step's `gap`, `weight` and `on` (the switch; for a time schedule,
    whether it guides) per sample. `t` is per sample `[B]`.
    """

    def __init__(self, net, guidance: Guidance, null_cond: int):
        self.net, self.guidance, self.null_cond = net, guidance, null_cond

    def init(self, batch: int) -> dict:
        return {"on": jnp.zeros((batch,), bool), "peak": jnp.zeros((batch,), jnp.float32)}

    def begin(self, state, x, t, cond):
        v_cond, v_null = _both(self.net, x, t, cond, None, self.null_cond)
        diff = (v_cond - v_null).astype(jnp.float32).reshape(x.shape[0], -1)
        gap = jnp.sqrt(jnp.sum(diff * diff, axis=1))
        g = self.guidance
        fire = gap < (1.0 - g.drop) * state["peak"]  # the peak of the steps before: 0 at first
        state = {"on": state["on"] | fire, "peak": jnp.maximum(state["peak"], gap)}
        w = g.weight(t, state["on"])
        on = state["on"] if g.carried else w != 1.0  # a time schedule: "on" where it guides
        return _mix(v_cond, v_null, w), state, {"gap": gap, "weight": w, "on": on}

    def velocity(self, state, x, t, cond):
        v_cond, v_null = _both(self.net, x, t, cond, None, self.null_cond)
        return _mix(v_cond, v_null, self.guidance.weight(t, state["on"]))
