"""Time the alignment DTW: tslearn (numba) against the kit's plain-Python reference.

    OMP_NUM_THREADS=2 python benchmarks/dtw_speed.py --n 200

Cost matrices are random, of the size the aligner meets: about 30 Whisper tokens (plus pause
rows) by 250 frames (5 s at 50 Hz). tslearn's kernel is compiled before the clock starts; the
first call's compile time is printed separately. Both must return the same paths.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from emo_lib.align import dtw_numpy, dtw_tslearn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="number of cost matrices")
    parser.add_argument("--tokens", type=int, default=30, help="rows of each matrix")
    parser.add_argument("--frames", type=int, default=250, help="columns of each matrix")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    costs = [-rng.random((args.tokens, args.frames)) for _ in range(args.n)]

    start = time.perf_counter()
    dtw_tslearn(np.zeros((2, 3)))  # numba compiles the kernel on the first call
    compile_s = time.perf_counter() - start

    start = time.perf_counter()
    fast = [dtw_tslearn(c) for c in costs]
    tslearn_s = time.perf_counter() - start

    start = time.perf_counter()
    slow = [dtw_numpy(c) for c in costs]
    numpy_s = time.perf_counter() - start

    same = sum(a[0] == b[0] for a, b in zip(fast, slow))
    worst = max(abs(a[1] - b[1]) for a, b in zip(fast, slow))
    print(f"{args.n} cost matrices of {args.tokens} x {args.frames}")
    print(f"tslearn first-call compile: {compile_s:.2f} s (not timed below)")
    print(f"tslearn  : {tslearn_s:8.3f} s total, {1e3 * tslearn_s / args.n:8.3f} ms per matrix")
    print(f"dtw_numpy: {numpy_s:8.3f} s total, {1e3 * numpy_s / args.n:8.3f} ms per matrix")
    print(f"ratio    : dtw_numpy / tslearn = {numpy_s / tslearn_s:.1f}x")
    print(f"same path: {same}/{args.n}, largest cost difference {worst:.2e}")


if __name__ == "__main__":
    main()
