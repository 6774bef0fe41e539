"""Closed forms for Gaussian data x1 ~ N(mu, Sigma) on the path x_t = (1-t) x0 + t x1.

With Sigma = U diag(lam) U^T, the marginal covariance is C_t = U diag((1-t)^2 + t^2 lam) U^T,
so every inverse is elementwise in the eigenbasis (no batched LAPACK calls at run time:
XLA:CPU in jax 0.10 can deadlock when one program holds several large batched solves).
"""

import jax.numpy as jnp
import numpy as np


def _eig(sigma):
    lam, u = np.linalg.eigh(np.asarray(sigma, np.float64))
    return jnp.asarray(lam, jnp.float32), jnp.asarray(u, jnp.float32)


def optimal_velocity(mu, sigma):
    """v*(x, t) = E[x1 - x0 | x_t = x] = mu + (t Sigma - (1-t) I) C_t^{-1} (x - t mu)."""
    lam, u = _eig(sigma)

    def v(x, t, *, cond=None, dt=None):
        t, m, lam_ = t[:, None], mu[None, :], lam[None, :]
        y = (x - t * m) @ u  # eigenbasis
        gain = (t * lam_ - (1 - t)) / ((1 - t) ** 2 + t**2 * lam_)
        return m + (gain * y) @ u.T

    return v


def score(mu, sigma):
    """∇ log p_t(x) = -C_t^{-1} (x - t mu)."""
    lam, u = _eig(sigma)

    def s(x, t):
        t, lam_ = t[:, None], lam[None, :]
        y = (x - t * mu[None, :]) @ u
        return -(y / ((1 - t) ** 2 + t**2 * lam_)) @ u.T

    return s
