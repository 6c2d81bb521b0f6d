"""ResNet-20 on CIFAR-10, gradual pruning to 90% (SGD, cosine schedule).

Needs CIFAR-10 prepared as ArrayRecord in --config.data_dir (no download here):
  tfds build cifar10 --data_dir=DIR --file_format=array_record   # on a machine with internet
  python -m experiments.train --config=experiments/configs/resnet20_cifar10.py \
      --workdir=runs/resnet20 --config.data_dir=DIR
Offline smoke test on the bundled digits (32x32, 3 channels):
  python -m experiments.train --config=experiments/configs/resnet20_cifar10.py \
      --workdir=runs/resnet20_digits --config.dataset=sklearn_digits --config.image_size=32 \
      --config.channels=3 --config.num_epochs=10
"""

import ml_collections

from experiments.configs import default


def get_config():
  config = default.get_config()
  config.dataset = "cifar10"
  config.model = ml_collections.ConfigDict({"name": "resnet20", "width": 16})
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = True
  config.weight_decay = 1e-4
  config.lr_schedule = "cosine"
  config.warmup_steps = 200
  config.batch_size = 128
  config.num_epochs = 160
  config.log_every = 200
  config.checkpoint_every = 2000
  config.pruning.allocation = "erk"
  config.pruning.start_fraction = 0.1
  config.pruning.end_fraction = 0.6
  config.pruning.update_every = 200
  return config
