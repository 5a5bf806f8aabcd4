"""Analytic FLOP counts of G, D and E, and of one train step, from the architecture tables.

What a reader can check against a compiled program (`bigbigan_jax.tools.aot`) or a paper:

  * A FLOP is one multiply or one add, so a multiply-accumulate is 2 FLOPs (what XLA's cost
    analysis and MFU figures use). Like XLA's cost analysis, a convolution counts only the
    kernel taps that land on the input, not those on its SAME zero padding: a 3x3 conv on a
    4x4 map does (10/12)² of the k²-per-output naive count, which matters at the deep 4x4
    and 8x8 layers of G and D, where the channels are widest.
  * Counted: convolutions, dense layers, the two attention matmuls, D's class projection.
    Not counted: element-wise work (activations, batch norm, pooling, up-sampling, residual
    adds, the optimiser). It scales with activations, not with activations x channels, so at
    the paper's widths it is a few percent of the total; the compiled count includes it.
  * Work independent of the batch: spectral norm's power iteration (each call computes
    u·Wᵀ, v·W and v·W·uᵀ on the (fan_in, out) kernel: 6·fan_in·out FLOPs, forward only,
    since u and v carry no gradient), which every data-parallel replica repeats, and the
    orthogonal regulariser on G (the Gram of each (fan_in, out) kernel, WᵀW or, where
    fan_in < out, WWᵀ: 2·fan_in·out·min(fan_in, out) forward), whose Gram columns the step
    splits over the data axis, so that each of N devices does 1/N of it.

One train step (`step_lib.train_step`), with f(·) a forward pass and backward = 2 x forward
(gradient w.r.t. the layer's input and w.r.t. its weights) unless said otherwise:

  d_steps x [ G f(B) + E f(B) + D f(2B) + D backward(2B) ]        = d_steps x [G + E + 3 D(2B)]
  + G f(B) + G backward(B) + E backward(B)                          = 3 G + 2 E
  + D f(2B) + D backward w.r.t. its inputs only (1 x forward)       = 2 D(2B)
  + the orthogonal regulariser's forward and backward               = 3 x ortho
  + spectral norm: one power iteration per SN layer per call (G and D in each D update;
    G and D in the E/G update)

E's forward in the E/G update is not counted again: that update reuses the last D update's
real batch, and E's weights do not change in between, so it is the same computation as the
last D update's E forward (batch statistics included; only ẑ's noise differs, after the
trunk and head) and XLA computes it once.
BigGAN has no E, and its G update runs D on the B fakes only: 2 D(B) instead of 2 D(2B).

What XLA's cost analysis of a TPU program leaves out: XLA:TPU fuses each forward
self-attention (θφᵀ, softmax, βg) into one kernel (a `tpu_custom_call`) whose FLOPs the cost
analysis does not count, about 1% of a BigGAN-128 step; the backward attention matmuls stay
ordinary ops and are counted. The compiled count includes the element-wise work this module
leaves out (about 1.5% at the paper's widths). The two roughly cancel.

`model.remat` (`nn.remat` on every residual block of G, D and E) reruns each block's forward
once in the backward pass: work the compiled program does but not model FLOPs. It is counted
apart ("recompute": the blocks' forward FLOPs wherever a backward pass runs through them:
D(2B) in each D update; G(B), E(B) and D(2B), or D(B) for BigGAN, in the E/G update), so a
compiled count can be checked against model + recompute while utilisation stays about the
model's FLOPs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import ml_collections

from bigbigan_jax.models import discriminator as discriminator_lib
from bigbigan_jax.models import encoder as encoder_lib
from bigbigan_jax.models import generator as generator_lib


@dataclasses.dataclass
class Count:
  """FLOPs of one network's forward pass, split by how they scale.

  Attributes:
    per_example: FLOPs per example (convs, dense layers, attention).
    in_blocks: the part of `per_example` inside residual blocks (what `model.remat`
      recomputes in the backward pass).
    sn_kernels: (fan_in, out) of every spectrally normalised kernel: one power iteration
      per call, whatever the batch.
    kernels: (fan_in, out) of every kernel (G's are what the orthogonal regulariser
      penalises).
  """

  per_example: float = 0.0
  in_blocks: float = 0.0
  sn_kernels: list = dataclasses.field(default_factory=list)
  kernels: list = dataclasses.field(default_factory=list)

  @contextlib.contextmanager
  def block(self):
    """Counts what is added inside the `with` as residual-block work too."""
    start = self.per_example
    yield
    self.in_blocks += self.per_example - start

  def conv(self, size: int, k: int, cin: int, cout: int, spectral: bool = True,
           stride: int = 1):
    """A k x k SAME conv from a (size, size, cin) map to cout channels."""
    self.per_example += conv_flops(1, size, size, k, cin, cout, stride)
    if spectral:
      self.sn_kernels.append((k * k * cin, cout))
    self.kernels.append((k * k * cin, cout))

  def dense(self, fin: int, fout: int, spectral: bool = True):
    self.per_example += dense_flops(1, fin, fout)
    if spectral:
      self.sn_kernels.append((fin, fout))
    self.kernels.append((fin, fout))

  def attention(self, size: int, c: int):
    """BigGAN's self-attention on a (size, size, c) map (keys and values pooled 2x)."""
    self.per_example += attention_matmul_flops(1, size, c)
    for cout in (c // 8, c // 8, c // 2):
      self.conv(size, 1, c, cout)
    self.conv(size, 1, c // 2, c)

  @property
  def sn_flops(self) -> float:
    """One power iteration on every SN kernel (per call, not per example)."""
    return float(sum(6 * fan_in * out for fan_in, out in self.sn_kernels))

  @property
  def ortho_flops(self) -> float:
    """Forward of the orthogonal regulariser's Gram matrices over `kernels` (the smaller of
    WᵀW and WWᵀ, as `losses.orthogonal_regularizer` forms them)."""
    return float(sum(2 * fan_in * out * min(fan_in, out) for fan_in, out in self.kernels))


def valid_taps(size: int, k: int, stride: int = 1) -> int:
  """(output position, kernel tap) pairs of a SAME conv along one axis whose input index is
  inside the map: size · k for a 1x1 conv, 3·size - 2 for a 3x3 one at stride 1. XLA pads
  SAME convs with total max((out - 1)·stride + k - size, 0), the smaller half before."""
  out = -(-size // stride)
  before = max((out - 1) * stride + k - size, 0) // 2
  return sum(0 <= o * stride + t - before < size for o in range(out) for t in range(k))


def conv_flops(batch: int, h: int, w: int, k: int, cin: int, cout: int,
               stride: int = 1) -> float:
  """A k x k SAME conv on a (B, h, w, C_in) input: 2 · B · C_in · C_out · (taps on the
  input along h) · (along w); 2 · B · H_out · W_out · k² · C_in · C_out less the padding."""
  return float(2 * batch * valid_taps(h, k, stride) * valid_taps(w, k, stride) * cin * cout)


def dense_flops(batch: int, fin: int, fout: int) -> float:
  return float(2 * batch * fin * fout)


def attention_matmul_flops(batch: int, size: int, c: int) -> float:
  """θφᵀ (queries hw x C/8 against hw/4 pooled keys) and βg (hw x hw/4 by hw/4 x C/2)."""
  q, k = size * size, size * size // 4
  return float(2 * batch * q * k * (c // 8) + 2 * batch * q * k * (c // 2))


def generator(model: ml_collections.ConfigDict) -> Count:
  """G's forward pass (BigGAN; unconditional BigBiGAN G has the same layers)."""
  ins, outs = generator_lib.G_ARCH[model.resolution]
  ch, chunk = model.ch, model.z_dim // (len(ins) + 1)
  cond = chunk + model.shared_dim
  count = Count()
  count.dense(chunk, 4 * 4 * ins[0] * ch)
  size = 4
  for cin_mult, cout_mult in zip(ins, outs):
    cin, cout = cin_mult * ch, cout_mult * ch
    size *= 2
    with count.block():
      count.dense(cond, cin)  # CBN1 gain and bias.
      count.dense(cond, cin)
      count.conv(size, 3, cin, cout)
      count.dense(cond, cout)  # CBN2 gain and bias.
      count.dense(cond, cout)
      count.conv(size, 3, cout, cout)
      count.conv(size, 1, cin, cout)  # Shortcut on the up-sampled input.
    if size == model.g_attention_res:
      count.attention(size, cout)
  count.conv(size, 3, outs[-1] * ch, 3)
  return count


def discriminator_trunk(model: ml_collections.ConfigDict) -> Count:
  """BigGAN D's trunk up to the pooled feature (F in BigBiGAN)."""
  outs, downs = discriminator_lib.D_ARCH[model.resolution]
  count = Count()
  size, cin = model.resolution, 3
  attention_after = discriminator_lib._first_block_at(  # pylint: disable=protected-access
      model.resolution, model.d_attention_res)
  for i, (out_mult, down) in enumerate(zip(outs, downs)):
    cout = out_mult * model.ch
    with count.block():
      count.conv(size, 3, cin, cout)
      count.conv(size, 3, cout, cout)
      if down or cin != cout:
        # The first block pools before its 1x1 shortcut; the others convolve first.
        count.conv(size // 2 if (down and i == 0) else size, 1, cin, cout)
    size = size // 2 if down else size
    cin = cout
    if i == attention_after:
      count.attention(size, cout)
  return count


def discriminator(model: ml_collections.ConfigDict) -> Count:
  """BigGAN D (with the projection head when conditional) or BigBiGAN's joint D."""
  count = discriminator_trunk(model)
  feat = discriminator_lib.D_ARCH[model.resolution][0][-1] * model.ch
  if model.kind == "biggan":
    count.dense(feat, 1)
    if model.num_classes:
      count.per_example += 2 * feat  # ⟨embed(y), h⟩; the lookup itself is free.
      count.sn_kernels.append((model.num_classes, feat))
    return count
  joint = model.joint
  _skip_mlp(count, model.z_dim, joint.h_width, joint.h_layers, spectral=True)
  _skip_mlp(count, feat + joint.h_width, joint.j_width, joint.j_layers, spectral=True)
  for fin in (feat, joint.h_width, joint.j_width):
    count.dense(fin, 1)
  return count


def _skip_mlp(count: Count, fin: int, width: int, layers: int, spectral: bool):
  count.dense(fin, width, spectral)
  for _ in range(layers - 1):
    count.dense(width, width, spectral)


def encoder(model: ml_collections.ConfigDict) -> Count:
  """E: ResNet-v2 or RevNet trunk, then the skip-MLP head to (μ, σ). No spectral norm."""
  enc = model.encoder
  width = enc.base_width * enc.width_multiplier
  count = Count()
  if enc.stem == "imagenet":
    count.conv(enc.resolution, 7, 3, width, spectral=False, stride=2)
    size = math.ceil(math.ceil(enc.resolution / 2) / 2)  # 3x3 max-pool, stride 2.
  else:
    count.conv(enc.resolution, 3, 3, width, spectral=False)
    size = enc.resolution
  cin = width
  units = encoder_lib.STAGE_UNITS[enc.depth]
  for stage, (num_units, stride) in enumerate(zip(units, encoder_lib.STAGE_STRIDES)):
    w = width * 2**stage
    for u in range(num_units):
      if u > 0 and enc.arch == "revnet":
        # Two bottlenecks (F and G) on half the 4w channels each, at width w/2.
        with count.block():
          for _ in range(2):
            _bottleneck(count, size, 2 * w, w // 2, 2 * w)
        continue
      s = stride if u == 0 else 1
      out_size = math.ceil(size / s)
      with count.block():
        count.conv(size, 1, cin, w, spectral=False)
        count.conv(size, 3, w, w, spectral=False, stride=s)
        count.conv(out_size, 1, w, 4 * w, spectral=False)
        if s != 1 or cin != 4 * w:
          count.conv(size, 1, cin, 4 * w, spectral=False, stride=s)
      size, cin = out_size, 4 * w
  _skip_mlp(count, cin, enc.head_width, enc.head_layers, spectral=False)
  count.dense(enc.head_width, 2 * model.z_dim, spectral=False)
  return count


def _bottleneck(count: Count, size: int, cin: int, width: int, cout: int):
  count.conv(size, 1, cin, width, spectral=False)
  count.conv(size, 3, width, width, spectral=False)
  count.conv(size, 1, width, cout, spectral=False)


def train_step(config: ml_collections.ConfigDict) -> dict:
  """FLOPs of one `step_lib.train_step` at the config's global batch (see the module doc).

  Returns:
    {"generator_forward", "encoder_forward", "discriminator_forward": per-example forward
    FLOPs; "model": the batch-proportional FLOPs of the whole step (global); "recompute":
    what `model.remat` adds to them (global; 0 without remat);
    "ortho": the orthogonal regulariser's forward and backward (global: the step splits it
    over the data axis; once per update, whatever optim.microbatches); "per_replica":
    spectral norm, which every data-parallel replica computes in full, once per micro-batch; "useful": model + ortho + per_replica, the step's FLOPs counted once
    for all devices, which utilisation figures divide by}. One device of N then runs about
    (model + recompute + ortho) / N + per_replica.
  """
  model, b, d_steps = config.model, config.batch_size, config.optim.d_steps
  g, d = generator(model), discriminator(model)
  bigbigan = model.kind == "bigbigan"
  e = encoder(model) if bigbigan else Count()
  gf, ef, df = g.per_example * b, e.per_example * b, d.per_example * b
  d_update = gf + ef + 3 * (2 * df)
  d_in_ge = 2 if bigbigan else 1  # D's batch in the E/G update, in units of B.
  ge_update = 3 * gf + 2 * ef + 2 * d_in_ge * df  # E's forward: the last D update's.
  model_flops = d_steps * d_update + ge_update
  recompute = 0.0
  if config.model.remat:
    recompute = b * (d_steps * 2 * d.in_blocks + g.in_blocks + e.in_blocks
                     + d_in_ge * d.in_blocks)
  # SN: G and D run once in each D update and once in the E/G update, per micro-batch.
  sn = config.optim.microbatches * (d_steps + 1) * (g.sn_flops + d.sn_flops)
  ortho = 3 * g.ortho_flops if config.loss.ortho_beta > 0 else 0.0
  return {
      "generator_forward": g.per_example,
      "encoder_forward": e.per_example,
      "discriminator_forward": d.per_example,
      "model": model_flops,
      "recompute": recompute,
      "ortho": ortho,
      "per_replica": sn,
      "useful": model_flops + ortho + sn,
  }
