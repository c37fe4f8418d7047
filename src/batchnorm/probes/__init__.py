"""Probes of how BN helps training, for any torch model (with or without BN layers).

Two views of internal covariate shift and one of the loss landscape, each taken at steps the
caller chooses, without disturbing training (the gradient probes work on a deep copy and
restore the random number generators):

- :func:`layer_drift` (:mod:`~batchnorm.probes.drift`): the BN paper's view, how far each
  layer's input distribution moved over training, one number per layer from
  :class:`batchnorm.monitor.ActivationMonitor` percentiles. Cost: post-processing only.
- :func:`gradient_ics` (:mod:`~batchnorm.probes.ics`): Santurkar et al.'s ICS, the change of
  a layer's gradient when the preceding layers take their step first (l2 distance and
  cosine). Cost: one model copy, L forward+backward passes for L layers.
- :func:`landscape_smoothness` (:mod:`~batchnorm.probes.smoothness`): loss variation,
  gradient predictiveness and effective beta-smoothness along the gradient. Cost: one model
  copy, 1 + (number of step sizes) forward+backward passes.
- :class:`TimeVaryingNoise`, :class:`NoisyBN`, :func:`add_noise_after_bn`
  (:mod:`~batchnorm.probes.noise`): the "noisy BN" intervention. Cost: one normal draw the
  size of each BN output per forward.

Reference: Santurkar, Tsipras, Ilyas & Madry, "How Does Batch Normalization Help
Optimization?", NeurIPS 2018 (arXiv 1805.11604).
"""

from batchnorm.probes._copies import batch_loss
from batchnorm.probes.drift import LayerDrift, layer_drift, unit_drift
from batchnorm.probes.ics import LayerICS, default_layers, gradient_ics
from batchnorm.probes.noise import NoisyBN, TimeVaryingNoise, add_noise_after_bn
from batchnorm.probes.smoothness import Smoothness, landscape_smoothness

__all__ = [
    "LayerDrift",
    "LayerICS",
    "NoisyBN",
    "Smoothness",
    "TimeVaryingNoise",
    "add_noise_after_bn",
    "batch_loss",
    "default_layers",
    "gradient_ics",
    "landscape_smoothness",
    "layer_drift",
    "unit_drift",
]
