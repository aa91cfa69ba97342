"""How fast can a CPU step Adam with companded 8-bit averages, rounded without bias? A bound, written by hand.

    python scripts/few_bit_bound.py [--numel N] [--threads T] [--steps S]

Compiles (gcc -O3 -march=native -fopenmp) a C loop that does what fastforeach's fused companded step does
(`lowbit.Companded`, `rounding='stochastic'`) the way a hand-written kernel would: one pass over each
64-element block, its new averages kept in the core's cache between the update and their coding (nothing
recomputed), each block's exact largest value for its scale, codes drawn with the same hashed noise
(`precision.hashed_noise`), the same float operations in the same order. It checks that loop against
fastforeach's step from the same state (params, codes and scales equal bit for bit), then times three
steps of one N-element param, interleaved, median of S: torch's fused float32 Adam (`Adam(fused=True)`),
fastforeach's fused companded step, and the C loop. One large param is the few-bit step's best case (no
per-call costs), so the C loop's time over torch's float32 step bounds what a plain hand-written kernel
of this format and rounding reaches on this CPU. The C loop is a measurement, not a fastforeach path
(fastforeach's kernels are PyTorch's or compiled by inductor).
"""
import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

SOURCE = r"""
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

static float bf16_up(float x) {  /* rounded up to bfloat16, as companded scales are */
  uint32_t b; memcpy(&b, &x, 4); b = (b + 0xFFFFu) & 0xFFFF0000u; memcpy(&x, &b, 4); return x; }
static float bf16_value(uint16_t h) { uint32_t b = (uint32_t)h << 16; float x; memcpy(&x, &b, 4); return x; }
static uint16_t bf16_bits(float x) { uint32_t b; memcpy(&b, &x, 4); return (uint16_t)(b >> 16); }

/* c: the compiled loop's coefficients (`CompiledStep.coefficient_vector`, Adam's layout `ADAM`): decay (p *= decay:
   AdamW's weight decay), l2 (g += l2 * p), mom, damp, sqr_mom, sqr_damp, 1/debias1, 1/debias2, lr, eps. */
void step(float *p, const float *g, uint8_t *m_codes, uint16_t *m_scales, uint8_t *v_codes, uint16_t *v_scales,
          int64_t blocks, const float *c, int threads) {
  const float decay = c[0], l2 = c[1], mom = c[2], damp = c[3], sqr_mom = c[4], sqr_damp = c[5], ib1 = c[6],
              ib2 = c[7], lr = c[8], eps = c[9];
  #pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t b = 0; b < blocks; b++) {
    float m[64], v[64], w[64], m_max = 0.f, v_max = 0.f;
    const float s1 = bf16_value(m_scales[b]), s2 = bf16_value(v_scales[b]);
    float *pb = p + b * 64; const float *gb = g + b * 64; uint8_t *mb = m_codes + b * 64, *vb = v_codes + b * 64;
    for (int i = 0; i < 64; i++) {  /* decode, update, keep the new values */
      float l = ((float)mb[i] - 127.f) * (1.f / 127.f), q = ((float)vb[i] + 1.f) * (1.f / 256.f) * s2;
      float gg = gb[i] + l2 * pb[i];
      float mm = mom * (l * fabsf(l) * s1) + damp * gg, vv = sqr_mom * (q * q) + sqr_damp * gg * gg;
      float pp = pb[i] * decay - lr * (mm * ib1) / (sqrtf(vv * ib2) + eps);
      m[i] = mm; v[i] = vv; w[i] = pp; pb[i] = pp;
      m_max = fmaxf(m_max, fabsf(mm)); v_max = fmaxf(v_max, vv);
    }
    const float S1 = bf16_up(m_max), S2 = bf16_up(sqrtf(v_max));
    const float i1 = S1 > 0.f ? 1.f / S1 : 0.f, i2 = S2 > 0.f ? (1.f / S2) * 256.f : 0.f;
    const int32_t *wi = (const int32_t *)w, *mi = (const int32_t *)m, *vi = (const int32_t *)v;
    for (int i = 0; i < 64; i++) {  /* code them, stochastically */
      int32_t salt = (int32_t)((uint32_t)wi[i] * 0x2545F491u);
      int32_t hm = ((int32_t)((uint32_t)(mi[i] ^ salt) * 0x2C1B3C6Du) >> 16) & 0xFFFF;
      int32_t hv = ((int32_t)((uint32_t)(vi[i] ^ salt) * 0x2C1B3C6Du) >> 16) & 0xFFFF;
      float x = m[i] * i1, level = sqrtf(fabsf(x)) * 127.f, below = fminf(floorf(level), 126.f);
      float k = below + (((float)hm * ((2.f * below + 1.f) * (1.f / 65536.f)) < level * level - below * below)
                         ? 1.f : 0.f);
      mb[i] = (uint8_t)(int32_t)((x < 0.f ? -k : k) + 127.f);
      float lv = sqrtf(v[i]) * i2 - 1.f, bv = fminf(fmaxf(floorf(lv), 0.f), 254.f);
      float up = ((float)hv * ((2.f * bv + 3.f) * (1.f / 65536.f)) < (lv + 1.f) * (lv + 1.f) - (bv + 1.f) * (bv + 1.f))
                 ? 1.f : 0.f;
      vb[i] = (uint8_t)(int32_t)(bv + up);
    }
    m_scales[b] = bf16_bits(S1); v_scales[b] = bf16_bits(S2);
  }
}
"""
# No contraction into fused multiply-adds, as inductor compiles (so the results are fastforeach's, bit for bit);
# the rest lets GCC vectorise sqrtf, floorf and the blocks' maxima (finite values only here).
FLAGS = ['-O3', '-march=native', '-fopenmp', '-ffp-contract=off', '-fno-strict-aliasing', '-fno-math-errno',
         '-fno-trapping-math', '-ffinite-math-only', '-fno-signed-zeros', '-fPIC', '-shared']


def build(workdir: Path) -> ctypes.CDLL:
    "The C loop, compiled into `workdir`."
    (workdir / 'step.c').write_text(SOURCE)
    subprocess.run(['gcc', *FLAGS, str(workdir / 'step.c'), '-o', str(workdir / 'step.so'), '-lm'], check=True)
    return ctypes.CDLL(str(workdir / 'step.so'))


def _coded(state: dict) -> list[torch.Tensor]:
    return [state[k] for k in ('grad_avg_codes', 'grad_avg_scale', 'sqr_avg_codes', 'sqr_avg_scale')]


def contenders(lib: ctypes.CDLL, numel: int, threads: int) -> dict:
    """Three steps of one `numel`-element param, each after a first step (state made, loops compiled), from
    equal params and gradients: torch's fused float32 Adam, fastforeach's fused companded step, and the C loop
    from a copy of the companded step's state. Then checks that one more step of the last two agrees bit for
    bit (raises `RuntimeError` if not); returns the three steps by name."""
    import fastforeach
    from fastforeach.optimizers.adam import fused_adam_step

    def adam(**options):
        gen = torch.Generator().manual_seed(0)
        p = torch.nn.Parameter(torch.randn(numel // 4096, 4096, generator=gen))
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        opt = fastforeach.Adam([p], 1e-3, fused=True, **options)
        opt.step()
        return p, opt

    (_, float32), (p8, companded) = adam(), adam(state_format='8bit-companded')
    w, mine = p8.detach().clone(), [t.clone() for t in _coded(companded.state[p8])]  # the C loop's copy
    # The second step's coefficients, as the compiled loop takes them.
    h, compiled = companded.hypers[0], fused_adam_step.compiled
    rule_c = compiled.layout.values(compiled.coefficients(step=2, lr=h['lr'], mom=h['mom'], sqr_mom=h['sqr_mom'],
                                                          eps=h['eps']))
    vector, _ = compiled.coefficient_vector(rule_c, p8, h['lr'], h['wd'], decouple_wd=True)
    ptr = lambda t: ctypes.c_void_p(t.data_ptr())
    m, m_scales, v, v_scales = mine

    def hand():
        lib.step(ptr(w), ptr(p8.grad), ptr(m), ptr(m_scales.view(torch.int16)), ptr(v), ptr(v_scales.view(torch.int16)),
                 ctypes.c_int64(numel // 64), ptr(vector), ctypes.c_int(threads))

    hand(); companded.step()
    if not (torch.equal(w, p8.detach()) and all(map(torch.equal, mine, _coded(companded.state[p8])))):
        raise RuntimeError("the C loop does not step as fastforeach's companded step does")
    return {'torch fused float32 Adam': float32.step, 'fastforeach fused, 8-bit companded': companded.step,
            'C loop, 8-bit companded': hand}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--numel', type=int, default=1 << 24)
    parser.add_argument('--threads', type=int, default=2)
    parser.add_argument('--steps', type=int, default=15)
    args = parser.parse_args()
    if args.numel <= 0 or args.numel % 4096:
        parser.error(f"--numel must be a positive multiple of 4096 (rows of 4096, blocks of 64), got {args.numel}")
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        steps = contenders(build(Path(tmp)), args.numel, args.threads)
        print("check: params, codes and scales equal to fastforeach's, bit for bit")
        times = {name: [] for name in steps}
        for i in range(3 + args.steps):
            for name, step in steps.items():
                start = time.perf_counter(); step(); elapsed = time.perf_counter() - start
                if i >= 3: times[name].append(elapsed)
    base = statistics.median(times['torch fused float32 Adam'])
    print(f"{args.numel} elements, {args.threads} threads, median of {args.steps} interleaved steps:")
    for name, ts in times.items():
        print(f"  {name:<36} {statistics.median(ts) * 1e3:7.2f} ms  {statistics.median(ts) / base:5.2f}x")


if __name__ == '__main__':
    main()
