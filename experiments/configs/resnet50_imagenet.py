"""ResNet-50 on ImageNet, gradual pruning to 80% (SGD, 5 warmup epochs, cosine, 90 epochs).

Needs ImageNet (ILSVRC 2012) prepared as ArrayRecord in --config.data_dir; it
cannot be downloaded: place ILSVRC2012_img_train.tar and
ILSVRC2012_img_val.tar in DIR/downloads/manual, then
  tfds build imagenet2012 --data_dir=DIR --file_format=array_record
  python -m experiments.train --config=experiments/configs/resnet50_imagenet.py \
      --workdir=runs/resnet50 --config.data_dir=DIR
The dense baseline (config.dense_baseline, on by default) is a second full
run; --config.dense_baseline=False skips it.

NOT RUN HERE: this checkout has no ImageNet and only CPUs, so neither the
accuracy nor the run time of this recipe has been measured with this code;
only its config checks and the model's shapes are tested.

Recipe: Goyal et al. (2017), "Accurate, Large Minibatch SGD: Training
ImageNet in 1 Hour", section 5.1, as in the Flax ImageNet example
(google/flax examples/imagenet): SGD with momentum 0.9, weight decay 1e-4,
learning rate 0.1 * batch / 256 reached by a linear warmup over 5 epochs,
90 epochs, the last BatchNorm scale of each block zero at init (in
`ResNet50`), random resized crops and flips (config.input.augment). Where
this config differs from them:
  - a cosine decay after the warmup (the Flax example's; Goyal et al. divide
    the rate by 10 at epochs 30, 60 and 80, which the trainer does not offer);
  - no Nesterov momentum (Goyal et al.'s; the Flax example uses Nesterov);
  - the weight decay is L2 added to the gradient of every parameter
    (experiments/methods.py, optax.add_decayed_weights), BatchNorm scales and
    offsets and the head's bias included; Goyal et al. and the Flax example
    leave the BatchNorm parameters (and the Flax example every 1-D
    parameter) undecayed.
Another global batch size B: set --config.batch_size=B,
--config.learning_rate=0.1*B/256 and --config.warmup_steps=5*(1281167//B).

Pruning: Zhu & Gupta's schedule from 0% at 10% of training to 80% at 60%
(epochs 9 to 54, while the rate is still high), masks updated every 1000 steps
(about 5 updates an epoch). Allocation 'erk' (Evci et al., 2020, RigL's
ResNet-50 setting): each kernel's density is fixed before training by its
shape (sum / product of its dimensions), so no layer can be pruned away, and
the small layers keep more weights than the large ones: at 80% the stem keeps
86%, stage 1's 1x1 convolutions all, the last stage's 3x3 ones 4%. 'global'
magnitude pruning would instead rank together kernels whose He-initialised
weights differ in scale with fan-out. The cost of 'erk': the dense early
layers run at high resolution, so it saves fewer FLOPs than 'uniform'.
"""

import ml_collections

from experiments.configs import default

IMAGENET_TRAIN_EXAMPLES = 1_281_167


def get_config() -> ml_collections.ConfigDict:
  config = default.get_config()
  config.dataset = "imagenet2012"
  config.eval_split = "validation"
  config.image_size = 224   # random resized crop (train), centre crop (eval)
  config.channels = 0       # already RGB
  config.input.augment = "imagenet"
  config.input.worker_count = 8
  config.input.mean = (0.485, 0.456, 0.406)  # the usual ImageNet statistics, in [0, 1] units
  config.input.std = (0.229, 0.224, 0.225)

  config.model = ml_collections.ConfigDict({"name": "resnet50", "width": 64})

  config.optimizer = "sgd"
  config.batch_size = 256   # global
  config.learning_rate = 0.1 * config.batch_size / 256
  config.momentum = 0.9
  config.nesterov = False
  config.weight_decay = 1e-4
  config.lr_schedule = "cosine"
  steps_per_epoch = IMAGENET_TRAIN_EXAMPLES // config.batch_size  # 5004: the trainer drops the rest
  config.warmup_steps = 5 * steps_per_epoch
  config.num_epochs = 90
  config.log_every = 100
  config.checkpoint_every = 5000  # about an epoch

  config.pruning.method = "gradual"
  config.pruning.sparsity = 0.8
  config.pruning.allocation = "erk"
  config.pruning.initial_sparsity = 0.0
  config.pruning.start_fraction = 0.1
  config.pruning.end_fraction = 0.6
  config.pruning.update_every = 1000
  return config
