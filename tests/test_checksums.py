"""The tiny configs' numbers after 3 train steps, recorded before the package was restructured.

A refactor of the step (objectives, layout, helpers) must not change what training computes:
these checksums were taken from the code as it stood before, and any change to them is a
change to the math, to be explained in the commit that makes it, not absorbed.
"""

import numpy as np
import pytest
from train_steps import flat
from train_steps import run_steps

pytestmark = pytest.mark.slow  # three train steps of each model kind.

# {tree: (sum |w|, sum w², w · r)} of params, G's EMA and the non-trained state (σ estimates,
# BN statistics) after 3 steps from PRNGKey(0) on seeded batches, on 1 CPU device.
RECORDED = {
    "bigbigan": {
        "ema": (1604.6232566662825, 309.54544128454495, -7.941381669392545),
        "params/discriminator": (1474.8001141587774, 225.9640964967914, 6.348224374280182),
        "params/encoder": (4064.4326340554962, 1134.8379400671051, 18.665088398776465),
        "params/generator": (1604.6214873944118, 309.5434041538949, -7.9462648523075705),
        "state/discriminator": (76.9017402241443, 41.947346176476636, -5.5543764930367345),
        "state/encoder": (484.1189986752579, 394.43290962741526, -14.634826614834035),
        "state/generator": (230.44703026117713, 151.04174870656226, -13.880299542076076),
    },
    "biggan": {
        "ema": (1619.5161934338485, 312.9985971429762, -1.9619895400556482),
        "params/discriminator": (1300.6728782564023, 178.0695699279417, 15.514400784167812),
        "params/generator": (1619.518810015275, 312.9978347828866, -1.9591504462053746),
        "state/discriminator": (60.64107287151273, 32.11428132937178, -8.881031787021449),
        "state/generator": (226.77974338987406, 146.41897216695514, -13.386778468687947),
    },
}


def checksums(state) -> dict:
  """{name: (sum |w|, sum w², w · r)} of every trained and carried tree of the state."""
  out = {}
  trees = {f"params/{k}": v for k, v in state.params.items()}
  trees["ema"] = state.ema_params
  trees.update({f"state/{k}": v for k, v in state.model_state.items()})
  for name, tree in sorted(trees.items()):
    v = flat(tree)
    # A fixed random direction: a change to any update moves the projection by ~√N · lr,
    # far beyond the tolerance, where the sums alone could cancel it out.
    r = np.random.default_rng(v.size).standard_normal(v.size)
    out[name] = (float(np.abs(v).sum()), float(np.square(v).sum()), float(v @ r))
  return out


@pytest.mark.parametrize("variant", sorted(RECORDED))
def test_three_steps_match_the_recorded_checksums(variant, load_config):
  config = load_config(f"tiny.py:{variant}")
  state = run_steps(config, num_steps=3)
  got = checksums(state)
  assert set(got) == set(RECORDED[variant])
  for name, expected in RECORDED[variant].items():
    np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6, err_msg=name)
