"""Times BigGAN-PyTorch's own training step, for `benchmark --biggan_pytorch=DIR`.

Not part of the package's runtime: `bigbigan_jax.tools.benchmark` runs this file as a script
with an interpreter that has torch, from a checkout of github.com/ajbrock/BigGAN-PyTorch that
the user provides (nothing of it is in this repository). It builds that repository's
`Generator` and `Discriminator` with the layout of our config, passed as one JSON argument,
and times its `train_fns.GAN_training_function` (d_steps D updates, one G update, Adam, hinge
losses, orthogonal regularisation of G, EMA of G) on random images and labels; it prints one
JSON line: the median step time and both networks' parameter counts.

  python biggan_pytorch_step.py '{"dir": "/path/to/BigGAN-PyTorch", "resolution": 32, ...}'
"""

import json
import statistics
import sys
import time


def main(spec: dict) -> dict:
  sys.path.insert(0, spec["dir"])
  import BigGAN  # noqa: PLC0415  (the user's checkout, found through sys.path above)
  import torch  # noqa: PLC0415
  import train_fns  # noqa: PLC0415
  import utils  # noqa: PLC0415

  torch.manual_seed(0)
  layout = dict(resolution=spec["resolution"], n_classes=spec["num_classes"],
                dim_z=spec["z_dim"], shared_dim=spec["shared_dim"], hier=True, G_shared=True,
                G_attn=spec["g_attn"], D_attn=spec["d_attn"], G_lr=spec["g_lr"],
                D_lr=spec["d_lr"], G_B1=spec["b1"], D_B1=spec["b1"], G_B2=spec["b2"],
                D_B2=spec["b2"], adam_eps=spec["eps"], G_init="ortho", D_init="ortho")
  g = BigGAN.Generator(G_ch=spec["ch"], skip_init=False, **layout)
  d = BigGAN.Discriminator(D_ch=spec["ch"], skip_init=False, **layout)
  g_ema = BigGAN.Generator(G_ch=spec["ch"], skip_init=True, no_optim=True, **layout)
  ema = utils.ema(g, g_ema, spec["ema_decay"], 0)
  z, y = utils.prepare_z_y(spec["batch"], spec["z_dim"], spec["num_classes"], device="cpu")
  train = train_fns.GAN_training_function(
      g, d, BigGAN.G_D(g, d), z, y, ema, {"itr": 0},
      dict(batch_size=spec["batch"], num_D_steps=spec["d_steps"], num_D_accumulations=1,
           num_G_accumulations=1, toggle_grads=True, split_D=False, D_ortho=0.0,
           G_ortho=spec["ortho"], ema=True, ema_start=0))
  # One real batch per D update, as the loop of their train.py hands it over.
  images = torch.rand(spec["batch"] * spec["d_steps"], 3, spec["resolution"],
                      spec["resolution"]) * 2 - 1
  labels = torch.randint(0, spec["num_classes"], (spec["batch"] * spec["d_steps"],))
  for _ in range(spec["warmup"] + 1):
    train(images, labels)
  times = []
  for _ in range(spec["steps"]):
    t0 = time.perf_counter()
    train(images, labels)
    times.append(time.perf_counter() - t0)
  count = lambda m: sum(p.numel() for p in m.parameters())
  return {"step_s": statistics.median(times), "step_s_min": min(times),
          "step_s_max": max(times), "threads": torch.get_num_threads(),
          "g_params": count(g), "d_params": count(d), "torch": torch.__version__}


if __name__ == "__main__":
  print(json.dumps(main(json.loads(sys.argv[1]))), flush=True)
