"""How much error conversion and load add to a half-precision checkpoint's vision tower.

    python scripts/conversion_precision.py [--size 256] [--depths 2,12,24,4,2]

A random-weight FastViTHD (timm's fastvit_mci3, every tensor randomized as the tests do) is
rounded to the source dtype (bfloat16, as Apple releases it, or float16), then taken the way
`convert` + `load` take it: sanitize (BatchNorm fold), one cast to the target dtype, `fuse()`.
Each line gives, for source -> target, the tower output's relative error against timm in
float32 on the same (upcast) source values, and against our own float32 conversion of those
upcast values. The second must be float32 rounding (<= 1e-6) for a float32 target: any more is
a rounding to the source dtype somewhere on the way.
"""

import argparse
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import reference as ref  # noqa: E402  (the tests' PyTorch oracle)

from fastvlm_mlx import weights as W  # noqa: E402
from fastvlm_mlx.config import VisionConfig  # noqa: E402
from fastvlm_mlx.vision import FastViTHD  # noqa: E402

DTYPES = {"bfloat16": (torch.bfloat16, mx.bfloat16), "float16": (torch.float16, mx.float16),
          "float32": (torch.float32, mx.float32)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--depths", default="2,12,24,4,2")
    a = p.parse_args()
    depths = [int(d) for d in a.depths.split(",")]
    x = ref.pixels(1, a.size, seed=3)
    for source in ("float32", "bfloat16", "float16"):
        timm_model = ref.timm_tower(depths, seed=2).to(DTYPES[source][0]).float()
        with torch.no_grad():
            expected = timm_model.forward_features(torch.from_numpy(x)).numpy()
        state = {"model.vision_tower.timm_model." + k: v.to(DTYPES[source][0])
                 for k, v in timm_model.state_dict().items()}
        source_tensors = {k: mx.array(v.float().numpy()).astype(DTYPES[source][1])
                          if v.is_floating_point() else mx.array(v.numpy()) for k, v in state.items()}
        upcast = {k: v.astype(mx.float32) for k, v in source_tensors.items()}
        ours_upcast = run_converted(upcast, depths, mx.float32, x)
        for target in ("float32", "float16"):
            ours = run_converted(source_tensors, depths, DTYPES[target][1], x)
            print(f"{source:>8} -> {target:<8} tower rel err vs timm {ref.rel_err(ours, expected):.2e}, "
                  f"vs the float32 conversion of the upcast source {ref.rel_err(ours, ours_upcast):.2e}"
                  f"  ({a.size} px, depths {a.depths})")


def run_converted(source_tensors, depths, dtype, x):
    """The tower as convert + load make it: sanitize, one cast to `dtype`, fuse; NCHW float32 out."""
    weights = {k[len("vision_tower."):]: v for k, v in W.sanitize(source_tensors).items()}
    tower = W.load_into(FastViTHD(VisionConfig(depths=depths)), weights, dtype).fuse()
    out = tower(mx.array(x.transpose(0, 2, 3, 1))).astype(mx.float32)
    return np.array(out).transpose(0, 3, 1, 2)


if __name__ == "__main__":
    main()
