"""Flow-matching Euler scheduler with a timestep shift (SD3's ``FlowMatchEulerDiscreteScheduler``).

``sigmas`` computes the schedule in float64. diffusers does its linspace in float64 too but takes σ_min
from a float32 training table and returns float32 sigmas; KerasHub does everything in float32
(``keras_sigmas`` repeats its operations). They differ by float32 rounding only (≲ 1e-7 relative), but a
timestep σ·1000 one float32 step apart (857.6924 against 857.6923) moved a 4-step image-to-image result
by 1.4e-5 relative against KerasHub, past float32 agreement (by hand, session 5, on a KerasHub preset the
golden sets do not have; the golden keras schedules are checked bit for bit in tests/test_pipeline.py).
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


def keras_sigmas(num_steps, shift=3.0, num_train_timesteps=1000):
    """``sigmas`` as KerasHub 0.32's FlowMatchEulerDiscreteScheduler computes them: every operation in
    float32 (σ_min from the float32 table, then its ``set_sigmas`` linspace between σ·1000 values), returned
    as float64 holding those float32 values."""
    f = np.float32

    def to_sigma(t):  # KerasHub's _timestep_to_sigma, in float32
        s = t / f(num_train_timesteps)
        return s if shift == 1.0 else f(shift) * s / (f(1) + f(shift - 1.0) * s)

    sigma_min, sigma_max = to_sigma(f(1)), to_sigma(f(num_train_timesteps))
    t = np.linspace(sigma_max * f(num_train_timesteps), sigma_min * f(num_train_timesteps), num_steps, dtype=f)
    return np.append(to_sigma(t), f(0)).astype(np.float64)


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
