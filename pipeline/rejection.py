"""Classifier-based rejection sampling (Razavi et al. 2019, VQ-VAE-2, section 4.2): draw more class-conditional
samples than needed and keep those a classifier finds most typical of the class they were asked for.

The acceptance rate ``accept`` sets the cost: ``ceil(num / accept)`` candidates are drawn for ``num`` kept. To
keep the classes as balanced as they were asked for, candidates are ranked within their asked class by the
classifier's probability of that class, and the ``num`` with the best within-class rank share are kept (a share
``accept`` of each class, up to rounding).

    A. Razavi, A. van den Oord, O. Vinyals. "Generating Diverse High-Fidelity Images with VQ-VAE-2",
    NeurIPS 2019, arXiv:1906.00446.
"""

from __future__ import annotations

import math

import numpy as np


def candidates_for(num: int, accept: float) -> int:
    """How many samples to draw to keep ``num`` at acceptance rate ``accept`` in (0, 1]."""
    if not 0 < accept <= 1:
        raise ValueError(f"accept={accept!r}: must be in (0, 1]")
    return math.ceil(num / accept - 1e-9)


def asked_class_probability(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Softmax probability of each row's asked class: logits (N, C), labels (N,) -> (N,)."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    return p[np.arange(len(labels)), labels]


def select_accepted(prob: np.ndarray, labels: np.ndarray, keep: int) -> np.ndarray:
    """Indices (ascending) of the ``keep`` candidates with the best rank share within their asked class: rank r
    (0 = most probable) among n_c candidates of class c has share (r + 0.5) / n_c; ties by probability."""
    if keep > len(prob):
        raise ValueError(f"keep={keep} but only {len(prob)} candidates")
    share = np.empty(len(prob))
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        order = idx[np.argsort(-prob[idx], kind="stable")]
        share[order] = (np.arange(len(idx)) + 0.5) / len(idx)
    best = np.lexsort((-prob, share))[:keep]  # by share, then by probability
    return np.sort(best)
