"""The paper's experiments, one module each (see :mod:`batchnorm.cli`)."""
