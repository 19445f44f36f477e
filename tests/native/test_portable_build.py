"""The native extension built for the compiler's baseline target (ENGINE_NATIVE_ARCH_FLAGS="": no
AVX2 / AVX-512, the portable kernels of csrc/vec16.h) still computes the small-row GEMM and
attention correctly: the code path of CPUs this machine is not. One build in a subprocess (its
own cache), checked against torch in float64."""
import os
import subprocess
import sys

CHECK = r"""
import torch
from engine.native import build as native_build
ext = native_build.load_extension()
assert ext.small_gemm_isa() == "portable", ext.small_gemm_isa()
gen = torch.Generator().manual_seed(0)
for m, k, n in ((1, 40, 33), (7, 64, 16), (16, 100, 70)):
    a, w = torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen)
    got = ext.small_gemm(a, ext.small_gemm_pack(w), n)
    want = a.double() @ w.double().t()
    assert (got.double() - want).abs().max() <= 1e-5 * want.abs().max(), (m, k, n)
for b, h, lq, lk, d in ((1, 2, 5, 17, 24), (2, 3, 20, 40, 64)):
    x = torch.randn(b, max(lq, lk), 3, h, d, generator=gen)
    q, k, v = x.permute(2, 0, 3, 1, 4)
    q, k, v = q[:, :, :lq], k[:, :, :lk], v[:, :, :lk]
    got = ext.attention(q, k, v, d ** -0.5)
    s = q.double() @ k.double().transpose(-1, -2) * d ** -0.5
    want = s.softmax(-1) @ v.double()
    assert (got.double() - want).abs().max() <= 5e-6 * want.abs().max(), (b, h, lq, lk, d)
print("portable ok")
"""


def test_portable_kernels_match_torch(tmp_path):
    env = dict(os.environ, ENGINE_NATIVE_ARCH_FLAGS="", ENGINE_CACHE_DIR=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0 and "portable ok" in proc.stdout, proc.stderr[-3000:]
