"""The paper's experiments, one command each (routed by :mod:`batchnorm.cli`).

Experiments (each exposes ``add_arguments(parser)`` and ``run(args) -> int``; config on top,
then the run): :mod:`~batchnorm.repro.mnist` (Figure 1), :mod:`~batchnorm.repro.inception`
(Figures 2-3), :mod:`~batchnorm.repro.lr_sweep` (claim 1), :mod:`~batchnorm.repro.depth`
(claims 4-5), :mod:`~batchnorm.repro.demo`; the two large ones keep their report in
``mnist_report`` / ``inception_report``.

Shared helpers, which import no experiment: :mod:`~batchnorm.repro.trainer` (the training
loop: state, evaluation, checkpoints, resume), :mod:`~batchnorm.repro.image_data` (data sets
by name, subsets, batch order), :mod:`~batchnorm.repro.sweep` (a setting varied, with and
without BN), :mod:`~batchnorm.repro.evaluation` (test accuracy three ways),
:mod:`~batchnorm.repro.report` (figures and numbers in words), :mod:`~batchnorm.repro.common`
(seeding, devices, processes, files, argument errors).
"""
