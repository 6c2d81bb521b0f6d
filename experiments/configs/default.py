"""Default: gradual magnitude pruning of LeNet-300-100 to 90% on the bundled digits.

  python -m experiments.train --config=experiments/configs/default.py --workdir=runs/default

Runs offline (scikit-learn's 8x8 digits through TFDS) in about a minute on 2
CPU cores: a dense baseline, then the same model pruned with the Zhu & Gupta
schedule from 10% to 66% of training, masks updated every 30 steps.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.seed = 0

  # Data: a TFDS name ('mnist', 'cifar10', ...) or the bundled 'sklearn_digits'.
  config.dataset = "sklearn_digits"
  config.data_dir = ""      # '' = TFDS default (~/tensorflow_datasets)
  config.image_size = 0     # resize to image_size x image_size; 0 keeps the native size
  config.channels = 0       # repeat grayscale to this many channels; 0 keeps them
  config.train_split = "train"
  config.eval_split = "test"  # evaluated every epoch and at the end
  config.input = ml_collections.ConfigDict()
  config.input.augment = "none"  # none | cifar (pad 4, crop, flip) | imagenet (random resized crop, flip)
  config.input.worker_count = 0  # Grain worker processes decoding and augmenting (0: threads here)
  config.input.prefetch = 2      # batches read ahead (per worker)
  config.input.cache_mb = 64.0   # a split whose decoded examples fit keeps them after the first read
  config.input.mean = ()         # per-channel mean in [0, 1] units; () estimates it on the train split
  config.input.std = ()

  config.model = ml_collections.ConfigDict()
  config.model.name = "mlp"           # mlp | lenet5 | resnet20 | resnet50 | vit | lm (tokens)
  config.model.features = (300, 100)  # LeNet-300-100

  config.optimizer = "adam"   # adam | adamw | sgd
  config.learning_rate = 1e-3
  config.lr_schedule = "constant"  # constant | cosine
  config.warmup_steps = 0
  config.momentum = 0.0       # sgd only
  config.nesterov = False     # sgd only
  config.weight_decay = 0.0   # adamw (decoupled), or sgd (L2, added to the gradient)

  config.batch_size = 128     # global batch, split over the devices
  # Devices (of every process) form a (data, fsdp) mesh: the batch is split over
  # all of them; params, optimizer state and masks are sharded over fsdp.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.fsdp = 1              # 1: every device holds the whole state (data parallel)
  config.mesh.fsdp_min_size = 2**14  # leaves with fewer entries stay replicated
  config.eval_batch_size = 512
  config.num_epochs = 150     # 11 steps per epoch on the 1437 training digits
  config.num_train_steps = -1  # > 0 overrides num_epochs
  config.log_every = 150      # steps between progress lines
  config.checkpoint_every = 300  # steps between checkpoints, a multiple of log_every (0: at the end)
  config.keep_checkpoints = 2    # newest checkpoints kept (0: all)

  config.pruning = ml_collections.ConfigDict()
  # dense | one_shot | gradual | nm | static | snip | synflow | ste | set | rigl | granet |
  # maskllm | jackpots | bip
  config.pruning.method = "gradual"
  config.pruning.sparsity = 0.9        # final sparsity of the prunable kernels
  config.pruning.allocation = "uniform"  # uniform | erk | global | lamp
  config.pruning.initial_sparsity = 0.0  # gradual: sparsity at start_fraction
  config.pruning.start_fraction = 0.1  # gradual: first pruning step; one_shot: the pruning step
  config.pruning.end_fraction = 0.66   # gradual: final sparsity reached here
  config.pruning.update_every = 30     # gradual: steps between mask updates
  config.pruning.power = 3.0           # gradual: exponent of the Zhu & Gupta schedule
  config.pruning.include = ""          # regex: prune only kernels whose path matches
  config.pruning.exclude = ""          # regex: never prune kernels whose path matches
  config.pruning.packed_masks = False  # masks in the optimizer state at 1 bit per weight, not 8
  # gradual | one_shot: prune whole units instead of weights: 'channel' (hidden units,
  # Conv channels) or 'head' (attention heads) of the model's structure spec
  # (experiments/models/structure.py); `sparsity` is then the fraction of units removed.
  config.pruning.structure = ml_collections.config_dict.placeholder(str)
  config.pruning.synflow_iterations = 100  # synflow: rounds of pruning at initialisation
  # snip: score in training mode (BatchNorm batch statistics, dropout on); default:
  # evaluation mode, as the SNIP and SynFlow reference code score it
  config.pruning.snip_train_mode = False
  # set | rigl | granet: drop and grow every update_every steps until end_fraction of
  # training, drop fraction decayed from drop_fraction. A field left None takes the
  # method's value (experiments.methods.DST_DEFAULTS): RigL's for set and rigl, GraNet's
  # code's for granet.
  placeholder = ml_collections.config_dict.placeholder
  config.pruning.dst = ml_collections.ConfigDict()
  config.pruning.dst.update_every = 100
  config.pruning.dst.drop_fraction = placeholder(float)  # alpha: rigl 0.3, granet 0.5
  config.pruning.dst.end_fraction = placeholder(float)   # rigl 0.75; granet 1.0 (to the end)
  config.pruning.dst.decay = "cosine"  # cosine | constant
  config.pruning.dst.min_drop_fraction = placeholder(float)  # cosine's end: rigl 0, granet 0.005
  config.pruning.dst.rounding = placeholder(str)  # drop count floor (rigl) | ceil (granet)
  # leaf | global (one drop count across layers, needs allocation 'global'); None:
  # rigl global iff allocation is 'global', granet leaf (it prunes globally, regrows per layer)
  config.pruning.dst.regrow_scope = placeholder(str)
  # True: an update step takes the optimizer step, then drops and grows from the stepped
  # weights (rigl's SET code, GraNet's code); False: it only drops and grows (rigl's RigL
  # code). None: set and granet True, rigl False.
  config.pruning.dst.gradient_on_update = placeholder(bool)
  # method 'nm': N:M structured sparsity (sparsity/allocation above are unused).
  config.pruning.nm = ml_collections.ConfigDict()
  config.pruning.nm.method = "srste"  # step | srste | mdgf_linear | mdgf_exp | sdgf_stepwise | sdgf_geometric
  config.pruning.nm.n = 2             # keep n of every m consecutive weights along the grouped axis
  config.pruning.nm.m = 4
  config.pruning.nm.dense_fraction = 0.1     # first part of training: dense
  config.pruning.nm.finetune_fraction = 0.1  # last part: hard N:M mask, fixed, pruned weights 0
  config.pruning.nm.update_every = 1    # steps between mask recomputations (sparse phase)
  # mdgf alpha per step; None: the library's default, 4 / (sparse-phase steps)
  config.pruning.nm.decay_coef = ml_collections.config_dict.placeholder(float)
  config.pruning.nm.srste_lambda = 2e-4  # srste: lambda of lambda*(1-E)*W
  config.pruning.nm.finetune_mask = "fixed"  # fixed | recompute (the reference code's, with STE)
  # Groups run along each kernel's contraction axes (sparsejax.layouts): Dense and
  # attention q/k/v axis 0, attention out (heads, head_dim), Conv Cin.
  config.pruning.nm.flatten = False     # convolutions: group along the flattened H*W*Cin instead
  config.pruning.nm.axes = {}           # {path_regex: axis or tuple of axes or 'conv'...}: per leaf
  config.pruning.nm.non_divisible = "error"  # error | dense: kernels whose axis M does not divide
  # maskllm | jackpots (or 'jackpot') | bip: learned masks (sparsejax.maskllm / jackpots / bip).
  # Dense training with the optimizer above for start_fraction of the run, then mask
  # learning from the weights reached (MaskLLM and Jackpots freeze them; BiP keeps training
  # them in its lower level); `sparsity` is the target (MaskLLM: n:m below).
  config.pruning.learned = ml_collections.ConfigDict()
  config.pruning.learned.start_fraction = 0.5
  config.pruning.learned.score_optimizer = "adam"  # adam | sgd (momentum 0.9): the scores' optimizer
  config.pruning.learned.score_lr = 0.01
  config.pruning.learned.n = 2                     # maskllm: n:m candidates
  config.pruning.learned.m = 4
  config.pruning.learned.temperature = (4.0, 0.05)  # maskllm: tau, linear from first to last
  config.pruning.learned.scale = (100.0, 500.0)     # maskllm: kappa, the logits' multiplier
  config.pruning.learned.prior = "magnitude"        # maskllm: magnitude | none
  config.pruning.learned.prior_strength = 3.0       # maskllm
  config.pruning.learned.init_std = 0.01            # maskllm: logits ~ N(0, init_std)
  config.pruning.learned.swap_rate = 1.0            # jackpots: fraction of crossings swapped per step
  config.pruning.learned.swap_end_fraction = 0.9    # jackpots: no swaps from here (the last epochs)
  config.pruning.learned.lr2 = 1e-4                 # bip: implicit-gradient coefficient (0: Hydra)
  config.pruning.learned.score_init_scale = 1.0     # bip: scores start at this times |theta|
  config.dense_baseline = True         # also train the dense model, in workdir/dense_baseline
  return config
