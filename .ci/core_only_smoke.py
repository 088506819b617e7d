"""Run in a virtualenv holding only torch and dpdm-core: the core must work on its own."""

import sys

import torch

from dpdm.core import get, names

assert names("backbone") == [] and names("dataset") == [], "dpdm-core alone must not see nets/data"
assert {"dpdm", "euler", "heun", "euler-stochastic", "dpmpp-2m"} <= set(names("sampler"))
D = lambda x, s, class_labels=None: 0.3 + 0.25 / (0.25 + s**2) * (x - 0.3)  # exact denoiser, N(0.3, 0.5²)
x = get("sampler", "heun")(D, torch.randn(4096, dtype=torch.float64) * 80, get("schedule", "karras")(18))
assert x.dtype == torch.float64 and abs(float(x.std()) - 0.5) < 0.05, float(x.std())
assert not any(m.startswith(("dpdm.nets", "dpdm.data", "dpdm.cli")) for m in sys.modules)
print("dpdm-core alone: ok")
