"""Geometry of the manifolds that flows live on, as pure `jax.numpy` functions.

- `manifolds.sphere`: the unit sphere Sⁿ ⊂ Rⁿ⁺¹ in ambient coordinates (points `[..., n+1]`
  with `|x| = 1`; tangent vectors `v` at `x` with `<x, v> = 0`): exp/log maps, geodesics,
  tangent projection, uniform sampling and density, latitude/longitude, great-circle distance.

No state, no networks: losses, samplers and metrics import these functions.
"""
