"""The fused J-BOND step of several checkouts of bond_jax, timed in turns on the same machine: one change's effect.

Each round runs every checkout once, in its own subprocess (its own `bond_jax` first on `sys.path`), on the shape
and settings of `train_step.py` (random weights, the shipped sentiment reward), timed by its `time_fused_step`: a
compiling logging period of `log_every` steps, then `--periods` timed ones, as seconds per step (median). A shared
machine's load drifts over minutes, so the checkouts alternate and each round's ratio to the first checkout is
reported, with their median.

  git worktree add /tmp/before <rev>
  python benchmarks/compare_steps.py /tmp/before . --shape large --rounds 3

The last line printed is one JSON object: per checkout, the seconds per step of each round, and the median of
its per-round speed-ups over the first checkout.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def time_checkout(checkout: str, shape: str, periods: int) -> float:
  """Seconds per fused step of the bond_jax in `checkout` (`--worker` in a subprocess)."""
  args = [sys.executable, os.path.abspath(__file__), "--worker", checkout, "--shape", shape,
          "--periods", str(periods)]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.abspath(checkout), HERE]))
  out = subprocess.run(args, env=env, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"{checkout} failed ({out.returncode}):\n{out.stderr[-4000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])["step_s"]


def worker(checkout: str, shape: str, periods: int) -> dict:
  """Times the fused step of the `bond_jax` importable here, which must be `checkout`'s."""
  import bond_jax  # pylint: disable=g-import-not-at-top  (only the worker imports JAX and bond_jax)
  import train_step as benchmark  # pylint: disable=g-import-not-at-top  (this folder's train_step.py)

  if not os.path.abspath(bond_jax.__file__).startswith(os.path.abspath(checkout)):
    raise RuntimeError(f"imported {bond_jax.__file__}, not the bond_jax of {checkout}")
  config, mc, _, params, reward_fn, optimizer, _, batch = benchmark.setup(shape, benchmark.FULL)
  step_s, _ = benchmark.time_fused_step(config, mc, params, reward_fn, optimizer, batch, periods)
  return {"step_s": step_s}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("checkouts", nargs="*", help="repository roots; the first is the baseline")
  parser.add_argument("--shape", default="default", help="a shape of train_step.SHAPES")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--periods", type=int, default=3, help="timed logging periods per run (median)")
  parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.worker:
    print(json.dumps(worker(args.worker, args.shape, args.periods)))
    return
  if len(args.checkouts) < 2:
    parser.error("give at least two checkouts: the baseline first")
  seconds = {c: [] for c in args.checkouts}
  for _ in range(args.rounds):
    for checkout in args.checkouts:
      seconds[checkout].append(time_checkout(checkout, args.shape, args.periods))
  baseline = seconds[args.checkouts[0]]
  print(f"{args.shape} shape, fused J-BOND step, {args.rounds} rounds in turns (seconds per step; speed-up over "
        f"{args.checkouts[0]})")
  results = {}
  for checkout, times in seconds.items():
    speedups = [b / t for b, t in zip(baseline, times)]
    print(f"{checkout:<40} {' '.join(f'{t:.4f}' for t in times)}  speed-up {statistics.median(speedups):.2f}x "
          f"({', '.join(f'{x:.2f}' for x in speedups)})")
    results[checkout] = {"step_s": [round(t, 5) for t in times], "speedup": round(statistics.median(speedups), 3)}
  print(json.dumps({"shape": args.shape, "checkouts": results}))


if __name__ == "__main__":
  main()
