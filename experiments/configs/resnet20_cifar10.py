"""ResNet-20 on CIFAR-10, gradual pruning to 90%, with the standard training recipe.

The recipe is that of He et al. 2016, "Deep Residual Learning for Image
Recognition", Sec. 4.2 (CIFAR-10): SGD with momentum 0.9, weight decay 1e-4
(L2, added to the gradient), batch 128, learning rate 0.1, about 64k
iterations (here 160 epochs = 62,400 steps), and their augmentation: pad 4
pixels, random 32x32 crop, horizontal flip. Two deliberate differences: a
cosine schedule instead of dividing by 10 at 32k and 48k iterations (both
are standard; the pruning literature uses either), and per-channel
standardisation (the usual CIFAR-10 mean and std) instead of subtracting the
per-pixel mean. With this recipe the dense ResNet-20 reaches about 91-92%
(He et al. report 91.25%); it has not been run to the end on this CPU.

Needs CIFAR-10 prepared as ArrayRecord in --config.data_dir (no download here):
  tfds build cifar10 --data_dir=DIR --file_format=array_record   # on a machine with internet
  python -m experiments.train --config=experiments/configs/resnet20_cifar10.py \
      --workdir=runs/resnet20 --config.data_dir=DIR
Offline smoke test on the bundled digits (32x32, 3 channels):
  python -m experiments.train --config=experiments/configs/resnet20_cifar10.py \
      --workdir=runs/resnet20_digits --config.dataset=sklearn_digits --config.image_size=32 \
      --config.channels=3 --config.num_epochs=10 --config.input.mean="()" --config.input.std="()"
"""

import ml_collections

from experiments.configs import default

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)  # per channel, in [0, 1] units, of the training set
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def get_config():
  config = default.get_config()
  config.dataset = "cifar10"
  config.model = ml_collections.ConfigDict({"name": "resnet20", "width": 16})
  config.input.augment = "cifar"
  config.input.worker_count = 2
  config.input.mean = CIFAR10_MEAN
  config.input.std = CIFAR10_STD
  config.optimizer = "sgd"
  config.learning_rate = 0.1
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  config.lr_schedule = "cosine"
  config.warmup_steps = 0
  config.batch_size = 128
  config.num_epochs = 160
  config.log_every = 200
  config.checkpoint_every = 2000
  config.pruning.allocation = "erk"
  config.pruning.start_fraction = 0.1
  config.pruning.end_fraction = 0.6
  config.pruning.update_every = 200
  return config
