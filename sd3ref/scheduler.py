"""Flow-matching Euler scheduler with a timestep shift (SD3's ``FlowMatchEulerDiscreteScheduler``).

The schedule is computed in float64. diffusers does its linspace in float64 too but takes σ_min from a
float32 training table and returns float32 sigmas; KerasHub does everything in float32. Both differ from
this schedule by float32 rounding only (≲ 1e-7 relative).
"""

from __future__ import annotations

import numpy as np


def shift_sigma(sigma, shift):
    """S(σ) = s·σ / (1 + (s-1)·σ): s > 1 spends more steps at high noise. S is the identity for s = 1."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sigmas(num_steps, shift=3.0, num_train_timesteps=1000, table_dtype=np.float64):
    """The N+1 sigmas of an N-step schedule: N decreasing from 1, then a terminal 0.

    σ_min is the last entry of the *shifted* training table, S(1/num_train_timesteps), and the linspace
    between 1 and σ_min is shifted again: σ_min is shifted twice, exactly as in SAI, diffusers and KerasHub.
    So the last nonzero sigma for N=28, shift 3 is 0.008929, not S(0.001) = 0.002994.
    ``table_dtype=np.float32`` computes that table entry in float32, as diffusers does even when the rest
    of its schedule is float64 (it moves the float64 sigmas by ~3e-10)."""
    d = np.dtype(table_dtype).type
    sigma_min = float(shift_sigma(d(1) / d(num_train_timesteps), d(shift)))
    t = np.linspace(num_train_timesteps, num_train_timesteps * sigma_min, num_steps, dtype=np.float64)
    return np.append(shift_sigma(t / num_train_timesteps, shift), 0.0)


def timesteps(sigmas_, num_train_timesteps=1000):
    """The MMDiT's timestep input for each step: σ·1000, a float, not rounded."""
    return np.asarray(sigmas_[:-1]) * num_train_timesteps


def step(x, v, sigma, sigma_next):
    """One Euler step of dx/dσ = v (σ_next < σ, so the step is negative).
    σ enters as a Python float so that a float64 schedule does not promote a float32 x to float64."""
    return x + float(sigma_next - sigma) * v


def add_noise(x0, eps, sigma):
    """The flow-matching forward process: x_σ = σ·ε + (1-σ)·x0 (σ a scalar, kept weak as in ``step``)."""
    sigma = float(sigma)
    return sigma * eps + (1.0 - sigma) * x0
