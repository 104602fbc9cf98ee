"""Wall-clock timing shared by the benchmark scripts (imported as `timing`: scripts run from this folder's path)."""

import statistics
import time
from collections.abc import Callable


def wall_times(fn: Callable[[], object], repeats: int) -> list[float]:
  """Wall times of `repeats` runs of `fn()`, after one warm-up (compiling) run; `fn` must block until done."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return times


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
  """Median of `wall_times(fn, repeats)`."""
  return statistics.median(wall_times(fn, repeats))
