"""Fixtures for the experiment tests: the bundled digits and a tiny config."""

import pytest

from experiments import input_pipeline
from experiments.configs import default


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
  """A TFDS data_dir with sklearn_digits prepared once for the whole session."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  input_pipeline.data_source("sklearn_digits", "train", data_dir)
  return data_dir


@pytest.fixture
def tiny_config(digits_dir):
  """The default config shrunk to a few seconds: small MLP, 40 steps, 80% target."""
  config = default.get_config()
  config.data_dir = digits_dir
  config.model.features = (32, 16)
  config.batch_size = 128  # 11 steps per epoch: evals at 11, 22, 33 and 40
  config.num_train_steps = 40
  config.log_every = 10
  config.checkpoint_every = 0  # only at the end
  config.pruning.sparsity = 0.8
  config.pruning.start_fraction = 0.1
  config.pruning.end_fraction = 0.5
  config.pruning.update_every = 5
  return config
