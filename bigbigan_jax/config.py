"""The configuration schema shared by every experiment, and its validation.

Each file in `configs/` starts from `base_config()` and changes a few fields, in the
flax-examples style. `validate()` checks a finished config and raises a ValueError that
names the field, the value and what is allowed; the trainer, the summary tool and the AOT
tool call it before building anything, so bad input never costs a compile.
"""

from __future__ import annotations

import importlib.util
import math
import os

import ml_collections

# Resolutions the networks know (their blocks: generator.G_ARCH, discriminator.D_ARCH).
RESOLUTIONS = (16, 32, 64, 128, 256)
MODEL_KINDS = ("bigbigan", "biggan")
ENCODER_ARCHS = ("resnet_v2", "revnet")
ENCODER_STEMS = ("imagenet", "small")
FX_POOLS = ("sum", "mean")
ENCODER_DEPTHS = (50, 26, 14)  # bottleneck units per stage: 50: 3-4-6-3, 26: 2-2-2-2, 14: 1-1-1-1
DATA_SOURCES = ("tfds", "digits", "folder")
AUGMENTATIONS = ("resnet", "center", "none")
TRUNCATIONS = ("resample", "scaled")
SCORE_REDUCTIONS = ("mean", "sum")
DTYPES = ("float32", "bfloat16")
CONV_WEIGHT_GRADS = ("auto", "xla", "matmul")
RESAMPLE_CONVS = ("auto", "fused", "separate")
MICROBATCH_LOOPS = ("auto", "scan", "unrolled")
# Evaluators `config.evals` may name (bigbigan_jax/evaluation/evaluators.py): "linear_probe" (BigBiGAN
# only: a linear classifier on E's frozen features), "fid" (FID and Inception Score of G),
# "judge" (a small classifier trained on the real data scores reconstructions and samples).
EVALUATORS = ("linear_probe", "fid", "judge")
PROBE_FEATURES = ("avepool_feat", "bn_crelu_feat")


def base_config() -> ml_collections.ConfigDict:
  """The BigBiGAN paper's recipe (Donahue & Simonyan 2019, with BigGAN's optimiser); experiment files change what differs."""
  c = ml_collections.ConfigDict()

  c.model = ml_collections.ConfigDict()
  c.model.kind = "bigbigan"  # "bigbigan": G + E + joint D; "biggan": class-conditional G + D.
  c.model.resolution = 128  # G's output and D's input.
  c.model.ch = 96  # Channel width multiplier of G and D.
  c.model.z_dim = 120  # Split into (#G blocks + 1) equal chunks.
  c.model.num_classes = 0  # 0: unconditional G (learned constant in the class slot), no projection in D.
  c.model.shared_dim = 128  # The shared class embedding (or the learned constant).
  c.model.class_constant_stddev = 1.0  # Init of the unconditional G's constant; 0: zeros.
  c.model.shared_init_scale = 1.0  # Multiplies the class embedding's orthogonal init.
  c.model.g_attention_res = 64  # Self-attention after the G block with this output size; 0: none.
  c.model.d_attention_res = 64  # Self-attention after the D block with this output size; 0: none.
  c.model.bn_eps = 1e-5
  c.model.bn_momentum = 0.9  # Decay of the running BN statistics used at evaluation.
  c.model.sn_eps = 1e-6
  c.model.dtype = "float32"  # Activations; parameters and optimizer state stay float32.
  c.model.remat = False  # Rematerialise residual blocks in the backward pass (memory for compute).
  # Kernel gradient of G's and D's convolutions: "xla", "matmul" (k² matmuls: ~5x faster on
  # XLA:CPU, the same numbers to float rounding) or "auto" (matmul on the CPU backend).
  c.model.conv_weight_grad = "auto"
  # G's up-sampling + first conv of a block and D's conv + average pool: "fused" (each one
  # convolution with 2.25x fewer FLOPs, the same values to float rounding), "separate", or
  # "auto" (fused on the CPU backend).
  c.model.resample_convs = "auto"

  c.model.encoder = ml_collections.ConfigDict()
  c.model.encoder.arch = "resnet_v2"
  c.model.encoder.stem = "imagenet"  # "imagenet" (7x7/2 conv + max pool) or "small" (3x3/1).
  c.model.encoder.depth = 50
  c.model.encoder.width_multiplier = 1  # RevNet-50 x4 is width_multiplier=4.
  c.model.encoder.base_width = 64  # Stem width; bottleneck widths are base, 2x, 4x, 8x (times 4 out).
  c.model.encoder.resolution = 256  # E's input; D sees real images average-pooled to model.resolution.
  c.model.encoder.head_width = 4096
  c.model.encoder.head_layers = 4
  c.model.encoder.min_stdev = 1e-4  # Added to softplus so z_stdev stays positive in float32.
  c.model.encoder.stochastic = True  # Gaussian E (the paper); False: z_sample = z_mean (BiGAN).

  c.model.joint = ml_collections.ConfigDict()
  c.model.joint.h_width = 2048  # H: MLP on z.
  c.model.joint.h_layers = 8
  c.model.joint.j_width = 2048  # J: MLP on concat(F(x), H(z)).
  c.model.joint.j_layers = 8
  c.model.joint.j_fx_pool = "sum"  # F(x) into J: "sum" (as s_x sees it) or "mean" over positions.

  c.loss = ml_collections.ConfigDict()
  c.loss.unary_x = True  # The paper's ablation switches for s_x and s_z; s_xz is always on.
  c.loss.unary_z = True
  c.loss.score_reduction = "mean"  # "mean" over the active scores (TF-Hub colab), or "sum".
  c.loss.ortho_beta = 1e-4  # Orthogonal regularisation of G's kernels; 0 turns it off.
  # Terms not in the papers, each 0 = off (objectives.py has their formulas):
  # BigBiGAN: E also regresses z from G's samples (BiGAN's "latent regressor"), weighted by
  # this; G gets its gradient too only with latent_regression_trains_g.
  c.loss.latent_regression = 0.0
  c.loss.latent_regression_trains_g = False
  # BigBiGAN: E also learns to reconstruct real images through G, mean((G(E(x)) - x)²) at D's
  # resolution (ALICE, Li et al. 2017); G learns from it too with image_reconstruction_trains_g.
  c.loss.image_reconstruction = 0.0
  c.loss.image_reconstruction_trains_g = False
  # BigGAN: D ranks real images' own labels above wrong ones, weighted (docs/conditioning.md).
  c.loss.wrong_label_ranking = 0.0
  c.loss.translate = 0  # BigGAN: every image D sees shifted up to this many pixels each way,
  c.loss.cutout = 0.0  # then a square of this fraction of its side blanked (DiffAugment).
  c.loss.lecam = 0.0  # BigGAN: LeCam's regulariser of D's scores (Tseng et al. 2021), weight.
  c.loss.mode_seeking = 0.0  # BigGAN: G's mode-seeking term (Mao et al. 2019), weight,
  c.loss.mode_seeking_from = 0  # from this train step on.

  c.optim = ml_collections.ConfigDict()
  c.optim.g_lr = 5e-5
  c.optim.e_lr = 5e-4  # The paper's best rows raise E's learning rate; ours is 10x G's.
  c.optim.d_lr = 2e-4
  c.optim.b1 = 0.0
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.d_steps = 2  # D updates per E/G update.
  # Not in the papers (1.0 = off): every learning rate held to step decay_from * steps, then
  c.optim.decay_from = 1.0  # decaying linearly to 0 at num_train_steps.
  # Gradient accumulation: each update averages the gradients of this many micro-batches of
  # batch_size / microbatches, so batch, rates and schedule keep their meaning; BN statistics
  # and spectral-norm iterations are per micro-batch (docs/design.md, "Gradient accumulation").
  c.optim.microbatches = 1
  # How the micro-batches run: "scan" (a lax.scan: one micro-batch's program, memory flat in
  # k), "unrolled" (k copies in one program) or "auto" (unrolled on the CPU, whose convolutions
  # run far slower inside loops; scan elsewhere).
  c.optim.microbatch_loop = "auto"

  c.ema = ml_collections.ConfigDict()
  c.ema.decay = 0.9999
  c.ema.start_step = 20_000  # Before this the EMA copy equals G's weights.

  c.data = ml_collections.ConfigDict()
  c.data.source = "tfds"  # "tfds" (any tfds name), "digits" (embedded, no download), "folder".
  c.data.name = "imagenet2012"  # tfds name for source="tfds".
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.data_dir = ""  # tfds data_dir; "" uses tfds' default.
  c.data.folder = ""  # For source="folder": a folder of images, one sub-folder per class.
  c.data.augment = "resnet"  # Training crop: "resnet" (random resized crop), "center", "none".
  c.data.random_flip = True
  c.data.shuffle_buffer = 10_000
  c.data.prefetch = 2
  # Images that fail to decode. False: the first batch holding one stops the run, naming the
  # file(s). True: folder sources decode every file once at start-up and leave the failures out
  # (one warning lists them); tfds sources drop failing records as they come (a warning counts).
  c.data.skip_corrupt = False

  c.sample = ml_collections.ConfigDict()
  c.sample.truncation = "resample"  # "resample" (paper) or "scaled" (TF-Hub t * truncnorm[-2, 2]).

  c.batch_size = 2048  # Global, over every device of every host.
  c.num_train_steps = 500_000
  c.seed = 0
  c.mesh = (("data", -1),)  # Axis names and sizes; -1 takes the remaining devices.
  c.shard_params = False  # Split params and optimiser state over "data" (ZeRO-3 style).
  c.distributed = False  # Call jax.distributed.initialize() first (multi-host).
  # In a multi-process run, a process not heard from for this long is lost: the others exit
  # (status 75) with a message instead of hanging in a collective (bigbigan_jax/training/faults.py).
  c.lost_process_timeout_s = 120.0

  c.log_every_steps = 100
  # TensorBoard's event files; "" is WORKDIR/tensorboard. Any folder TensorFlow's filesystem
  # reaches (local, gs://): tf.summary writes them, not bigbigan_jax/storage.py.
  c.tensorboard_dir = ""
  c.checkpoint_every_steps = 5_000
  # Kept: the newest keep_checkpoints, every multiple of keep_every_steps (0: none), and the
  # keep_best best by keep_best_metric, a key of eval/step_*.json ("samples/classifier_fid"
  # with mode "min"; "probe/avepool_feat/top1" with "max"). Evaluated steps are all saved.
  c.keep_checkpoints = 3
  c.keep_every_steps = 50_000  # Ten snapshots of a 500K-step run (docs/design.md: their cost).
  c.keep_best = 0
  c.keep_best_metric = ""
  c.keep_best_mode = "max"

  # Collapse rules over the logged metrics (bigbigan_jax/training/collapse.py; 0 turns one off).
  c.collapse = ml_collections.ConfigDict()
  c.collapse.window = 10  # Logs each rule looks back over.
  c.collapse.sigma_growth = 4.0  # A layer's σ0 over this many times its window minimum.
  c.collapse.d_accuracy = 0.99  # D's accuracy at or above this...
  c.collapse.pinned_logs = 5  # ...on this many consecutive logs.
  c.collapse.g_loss_jump = 3.0  # G's loss this far above its window median.
  c.collapse.eval_worse = 3  # The eval metric worse on this many evaluations in a row.
  c.collapse.eval_metric = ""  # "" takes keep_best_metric and keep_best_mode.
  c.collapse.eval_metric_mode = "max"
  c.collapse.stop_on_collapse = False  # Save and stop when a rule fires.
  c.sample_every_steps = 5_000
  c.num_sample_images = 64
  c.eval_every_steps = 0  # Run config.evals every this many steps (0: only at the end).
  c.evals = ()  # Names from EVALUATORS; the trainer runs them, and `--mode=eval` (all if empty).

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 256  # Examples per compiled G/E/Inception call (global).
  c.eval.seed = 0  # Latents of the FID samples; the probe's minibatch order.
  # Linear probe (BigBiGAN): frozen E features of config.data's probe_train_split, a softmax
  # classifier on them, top-1/top-5 on probe_test_split (the paper: train / validation).
  c.eval.probe_train_split = "train"
  c.eval.probe_test_split = "validation"
  # First N examples of each split (0: all). Features stay in host memory: ImageNet's whole
  # train split as ResNet-50 bn_crelu_feat is ~40 GB.
  c.eval.probe_max_examples = 0
  c.eval.probe_features = PROBE_FEATURES
  c.eval.probe_steps = 500  # AdamW steps, cosine-decayed learning rate.
  c.eval.probe_lr = 1e-2
  c.eval.probe_weight_decay = 1e-4
  c.eval.probe_batch_size = 0  # 0: full batch.
  c.eval.probe_baselines = False  # Also probe raw pixels and a freshly initialised E.
  # FID and Inception Score of G (EMA weights) against statistics of real data.
  c.eval.inception_path = ""  # FID Inception weights (.npz); see bigbigan_jax/evaluation/inception_weights.py.
  c.eval.num_samples = 50_000  # The papers' count.
  c.eval.is_splits = 10
  c.eval.truncation = 0.0  # 0: z ~ N(0, I); else truncated with sample.truncation's method.
  c.eval.standing_stats_batches = 0  # >0: re-estimate G's BN statistics first (BigGAN's way).
  c.eval.fid_reference_split = "train"
  c.eval.fid_reference_examples = 50_000  # First N of the split (0: all).
  c.eval.fid_stats_path = ""  # Cached reference statistics; "": WORKDIR/eval/fid_reference_*.npz.
  # The judge (bigbigan_jax/evaluation/judge.py): a classifier trained on probe_train_split's real images
  # labels G(E(x)) of probe_test_split (recon/class_keep) and G's samples (classifier IS/FID,
  # class accuracy of a class-conditional G). G uses standing statistics when
  # eval.standing_stats_batches > 0, as for FID.
  c.eval.judge_steps = 600
  c.eval.judge_num_samples = 1_000
  return c


def _fail(field: str, value, allowed: str):
  raise ValueError(f"config.{field}={value!r} is invalid: {allowed}. "
                   f"Set it in the config file or with --config.{field}=...")


def _one_of(config, field: str, allowed):
  value = config
  for part in field.split("."):
    value = value[part]
  if value not in allowed:
    _fail(field, value, "allowed values are " + ", ".join(repr(a) for a in allowed))
  return value


def _positive(config, field: str, integer: bool = True):
  value = config
  for part in field.split("."):
    value = value[part]
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  if integer:
    ok = is_number and math.isfinite(value) and int(value) == value and value >= 1
  else:
    ok = is_number and math.isfinite(value) and value > 0
  if not ok:
    _fail(field, value, "it must be a positive " + ("integer" if integer else "finite number"))
  return value


def num_g_blocks(resolution: int) -> int:
  """G's residual blocks at a resolution: 4x4 doubled up to it (32 is BGP's 3-block CIFAR net;
  16 is that net less its first block, for data with little more than 8x8 of detail)."""
  return {16: 2, 32: 3, 64: 4, 128: 5, 256: 6}[resolution]


def validate_model(model: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first invalid model field. Cheap: no jax work."""
  c = ml_collections.ConfigDict({"model": model})
  kind = _one_of(c, "model.kind", MODEL_KINDS)
  res = _one_of(c, "model.resolution", RESOLUTIONS)
  _positive(c, "model.ch")
  _positive(c, "model.z_dim")
  _positive(c, "model.shared_dim")
  _one_of(c, "model.dtype", DTYPES)
  _one_of(c, "model.conv_weight_grad", CONV_WEIGHT_GRADS)
  _one_of(c, "model.resample_convs", RESAMPLE_CONVS)
  chunks = num_g_blocks(res) + 1
  if model.z_dim % chunks:
    _fail("model.z_dim", model.z_dim,
          f"at resolution {res} G has {chunks - 1} blocks, so z is split into {chunks} equal "
          f"chunks and z_dim must be a multiple of {chunks} (e.g. {chunks * 20})")
  if not isinstance(model.num_classes, int) or model.num_classes < 0:
    _fail("model.num_classes", model.num_classes, "it must be 0 (unconditional) or a class count")
  if kind == "biggan" and model.num_classes < 1:
    _fail("model.num_classes", model.num_classes, "BigGAN is class-conditional: give the class count")
  for field in ("g_attention_res", "d_attention_res"):
    value = model[field]
    allowed = [0] + [res >> i for i in range(num_g_blocks(res)) if res >> i >= 8]
    if value not in allowed:
      _fail(f"model.{field}", value, "it must be 0 (no attention) or a feature-map size the "
            f"network passes through: one of {allowed}")
  for field in ("bn_eps", "sn_eps"):
    _positive(c, f"model.{field}", integer=False)
  _positive(c, "model.shared_init_scale", integer=False)
  stddev = model.class_constant_stddev
  if not (isinstance(stddev, (int, float)) and math.isfinite(stddev) and stddev >= 0):
    _fail("model.class_constant_stddev", stddev, "it must be a finite number >= 0")
  if not 0 <= model.bn_momentum < 1:
    _fail("model.bn_momentum", model.bn_momentum, "it must be in [0, 1)")
  if kind == "bigbigan":
    enc = model.encoder
    _one_of(c, "model.encoder.arch", ENCODER_ARCHS)
    _one_of(c, "model.encoder.stem", ENCODER_STEMS)
    _one_of(c, "model.joint.j_fx_pool", FX_POOLS)
    _one_of(c, "model.encoder.depth", ENCODER_DEPTHS)
    for field in ("width_multiplier", "base_width", "head_width", "head_layers", "resolution"):
      _positive(c, f"model.encoder.{field}")
    if enc.arch == "revnet" and enc.base_width % 2:
      _fail("model.encoder.base_width", enc.base_width, "RevNet splits channels in two: use an even width")
    if enc.resolution % res or (enc.resolution // res) & (enc.resolution // res - 1):
      _fail("model.encoder.resolution", enc.resolution,
            f"it must be model.resolution ({res}) times a power of two, since D sees real images "
            "average-pooled from E's input")
    if enc.resolution < 32:
      _fail("model.encoder.resolution", enc.resolution, "the ResNet/RevNet trunk needs at least 32")
    _positive(c, "model.encoder.min_stdev", integer=False)
    if not isinstance(enc.stochastic, bool):
      _fail("model.encoder.stochastic", enc.stochastic, "it must be True or False")
    for field in ("h_width", "h_layers", "j_width", "j_layers"):
      _positive(c, f"model.joint.{field}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Validates a whole experiment config (model, loss, optimiser, data, loop settings)."""
  validate_model(config.model)
  _one_of(config, "loss.score_reduction", SCORE_REDUCTIONS)
  if config.loss.ortho_beta < 0 or not math.isfinite(config.loss.ortho_beta):
    _fail("loss.ortho_beta", config.loss.ortho_beta, "it must be a finite number >= 0")
  for field, what in (("latent_regression", "trains E on G's samples"),
                      ("image_reconstruction", "trains E to invert G")):
    if _non_negative(config, f"loss.{field}", integer=False) and (
        config.model.kind != "bigbigan"):
      _fail(f"loss.{field}", config.loss[field],
            f"it {what}, and model.kind='biggan' has no E: set it to 0")
  if _non_negative(config, "loss.wrong_label_ranking", integer=False) and not (
      config.model.kind == "biggan" and config.model.num_classes > 1):
    _fail("loss.wrong_label_ranking", config.loss.wrong_label_ranking, "it ranks real images' "
          "labels: a class-conditional BigGAN (model.kind='biggan', num_classes >= 2) only")
  for field in ("translate", "cutout", "lecam", "mode_seeking", "mode_seeking_from"):
    if (_non_negative(config, f"loss.{field}", integer=field in ("translate", "mode_seeking_from"))
        and config.model.kind != "biggan"):
      _fail(f"loss.{field}", config.loss[field], "BigGAN only: set it to 0")
  if config.loss.cutout >= 1:
    _fail("loss.cutout", config.loss.cutout, "a fraction of the image side: below 1")
  for field in ("latent_regression_trains_g", "image_reconstruction_trains_g"):
    if not isinstance(config.loss[field], bool):
      _fail(f"loss.{field}", config.loss[field], "it must be True or False")
  for field in ("g_lr", "e_lr", "d_lr", "eps"):
    _positive(config, f"optim.{field}", integer=False)
  for field in ("b1", "b2"):
    value = config.optim[field]
    if not (isinstance(value, (int, float)) and 0 <= value < 1):
      _fail(f"optim.{field}", value, "Adam's beta must be a finite number in [0, 1)")
  _positive(config, "optim.d_steps")
  if _non_negative(config, "optim.decay_from", integer=False) > 1:
    _fail("optim.decay_from", config.optim.decay_from,
          "it is a fraction of num_train_steps, at most 1 (1: constant learning rates)")
  _positive(config, "optim.microbatches")
  _one_of(config, "optim.microbatch_loop", MICROBATCH_LOOPS)
  if not (0 <= config.ema.decay < 1):
    _fail("ema.decay", config.ema.decay, "it must be in [0, 1)")
  _one_of(config, "data.source", DATA_SOURCES)
  _one_of(config, "data.augment", AUGMENTATIONS)
  _one_of(config, "sample.truncation", TRUNCATIONS)
  for field in ("batch_size", "num_train_steps", "log_every_steps", "checkpoint_every_steps",
                "keep_checkpoints", "num_sample_images"):
    _positive(config, field)
  _positive(config, "lost_process_timeout_s", integer=False)
  _non_negative(config, "keep_every_steps")
  _one_of(config, "keep_best_mode", ("min", "max"))
  _one_of(config, "collapse.eval_metric_mode", ("min", "max"))
  for field in ("window", "pinned_logs", "eval_worse"):
    _non_negative(config, f"collapse.{field}")
  for field in ("sigma_growth", "d_accuracy", "g_loss_jump"):
    _non_negative(config, f"collapse.{field}", integer=False)
  if not isinstance(config.collapse.stop_on_collapse, bool):
    _fail("collapse.stop_on_collapse", config.collapse.stop_on_collapse, "True or False")
  if _non_negative(config, "keep_best") and not (config.keep_best_metric and config.evals):
    _fail("keep_best", config.keep_best, "the best checkpoints are chosen by an evaluation "
          "result: set keep_best_metric (e.g. 'samples/classifier_fid' with keep_best_mode="
          "'min') and config.evals" + ("" if config.evals else ", which is empty"))
  if not isinstance(config.data.skip_corrupt, bool):
    _fail("data.skip_corrupt", config.data.skip_corrupt, "it must be True or False")
  if config.data.source == "folder" and not config.data.folder:
    _fail("data.folder", config.data.folder, "data.source='folder' needs the folder's path")
  validate_eval(config)


def _non_negative(config, field: str, integer: bool = True):
  value = config
  for part in field.split("."):
    value = value[part]
  is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
  ok = is_number and math.isfinite(value) and value >= 0
  if not ok or (integer and int(value) != value):
    _fail(field, value, "it must be " + ("an integer" if integer else "a finite number") + " >= 0")
  return value


def validate_eval(config: ml_collections.ConfigDict) -> None:
  """Checks config.evals, config.eval_every_steps and config.eval.*."""
  evals = config.evals
  if isinstance(evals, str) or not all(isinstance(name, str) for name in evals):
    _fail("evals", evals, "give a tuple of evaluator names, e.g. ('linear_probe', 'fid')")
  for name in evals:
    if name not in EVALUATORS:
      _fail("evals", evals, f"{name!r} is not an evaluator; allowed values are "
            + ", ".join(repr(a) for a in EVALUATORS))
  if "linear_probe" in evals and config.model.kind != "bigbigan":
    _fail("evals", evals, "'linear_probe' probes the encoder's features, and only "
          "model.kind='bigbigan' has an encoder")
  _non_negative(config, "eval_every_steps")
  for field in ("batch_size", "num_samples", "is_splits", "probe_steps", "judge_steps",
                "judge_num_samples"):
    _positive(config, f"eval.{field}")
  for field in ("probe_max_examples", "probe_batch_size", "fid_reference_examples",
                "standing_stats_batches"):
    _non_negative(config, f"eval.{field}")
  _positive(config, "eval.probe_lr", integer=False)
  _non_negative(config, "eval.probe_weight_decay", integer=False)
  _non_negative(config, "eval.truncation", integer=False)
  if config.eval.is_splits > config.eval.num_samples:
    _fail("eval.is_splits", config.eval.is_splits,
          f"it must not exceed eval.num_samples ({config.eval.num_samples})")
  features = config.eval.probe_features
  if (isinstance(features, str) or not features
      or any(f not in PROBE_FEATURES for f in features)):
    _fail("eval.probe_features", features, "give a non-empty tuple of "
          + ", ".join(repr(f) for f in PROBE_FEATURES))


def with_defaults(stored: dict) -> ml_collections.ConfigDict:
  """A config saved by an earlier version, with the fields added since at their defaults.

  Every field added to `base_config` keeps the earlier behaviour as its default, so a
  checkpoint's config read this way describes the same networks it was trained with.
  """
  config = base_config()
  def merge(node, values):
    for key, value in values.items():
      if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
        merge(node[key], value)
      else:
        node[key] = value
  with config.unlocked():
    merge(config, stored)
  return config


def load(spec: str) -> ml_collections.ConfigDict:
  """Loads `path/to/config.py[:variant]` the way `--config=` does, for tests and notebooks."""
  path, _, variant = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no config file at {path!r}")
  module_spec = importlib.util.spec_from_file_location("_bigbigan_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()
