r"""Pass rate against KL(π || π_ref) over training for the `configs/verifiable.py` runs, with Best-of-N sampling.

  for s in 0 1 2; do for m in jbond_tie_aware jbond_paper reinforce; do
    python experiments/run.py --config=configs/verifiable.py:$m --workdir=/tmp/verifiable/$m/seed$s --config.seed=$s
  done; done
  python experiments/plot_verifiable.py --workdir=/tmp/verifiable --seeds=0,1,2

Reads each `<workdir>/<method>/seed<s>/metrics.jsonl` (the held-out `eval/reward/policy`, the pass rate, and
`eval/kl/policy_ref` logged every `eval_every` steps) and draws one line per method, the mean over seeds at each
evaluation, starting at the reference.
Best-of-N of the reference is exact rather than the tie-free bound `log N - (N-1)/N`: for a right/wrong reward and
a prompt on which the reference passes with probability p, Best-of-N passes with `q = 1 - (1-p)^N` and, since
Theorem 1 reweights every right answer alike and every wrong answer alike, `KL(π_BoN || π_ref) = q log(q/p) +
(1-q) log((1-q)/(1-p))`; p is estimated per held-out prompt from `--bon_samples` reference samples. Writes
`<workdir>/verifiable.png` and the numbers in `<workdir>/verifiable.json`.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # Run from a source checkout.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import jax
import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from bond_jax import paths  # pylint: disable=g-import-not-at-top
from bond_jax import sampling
from bond_jax.data import prompt_batches
from bond_jax.data import prompt_encoding
from bond_jax.data import prompt_sources
from bond_jax.models import hf
from bond_jax.tasks import arithmetic

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory holding one run workdir per method.")
_METHODS = flags.DEFINE_list("methods", ["jbond_tie_aware", "jbond_paper", "reinforce"], "Run subdirectories.")
_SEEDS = flags.DEFINE_list("seeds", ["0"], "Seeds: runs are <workdir>/<method>/seed<s>.")
_BON_NS = flags.DEFINE_list("bon_ns", ["1", "2", "4", "8", "16"], "Best-of-N sizes to mark.")
_BON_SAMPLES = flags.DEFINE_integer("bon_samples", 64, "Reference samples per held-out prompt for p.")
flags.mark_flag_as_required("workdir")

LABELS = {"jbond_tie_aware": "J-BOND, tie-aware reward", "jbond_paper": "J-BOND, paper's reward",
          "reinforce": "REINFORCE (β_KL = 0.05)"}


def read_eval_curve(workdir: str) -> list[tuple[int, float, float]]:
  """`[(step, KL(π || π_ref), pass rate)]` from a run's eval records, led by the reference at step 0."""
  curve = []
  for line in (paths.as_path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line)
    if "eval/reward/policy" in record:
      if not curve:
        curve.append((0, 0.0, record["eval/reward/reference"]))
      curve.append((record["step"], record["eval/kl/policy_ref"], record["eval/reward/policy"]))
  if not curve:
    raise ValueError(f"{workdir}/metrics.jsonl has no eval records (eval/reward/policy).")
  return curve


def mean_curve(curves: list[list[tuple[int, float, float]]]) -> list[tuple[int, float, float, float]]:
  """`[(step, mean KL, mean pass rate, standard error of the pass rate)]` over seeds, at the steps all share."""
  steps = sorted(set.intersection(*({s for s, _, _ in c} for c in curves)))
  at = [dict((s, (k, r)) for s, k, r in c) for c in curves]
  rows = []
  for step in steps:
    kls, rates = np.asarray([a[step] for a in at]).T
    rows.append((step, float(kls.mean()), float(rates.mean()), float(rates.std(ddof=1) / np.sqrt(len(rates)))
                 if len(rates) > 1 else 0.0))
  return rows


def reference_pass_rates(config: dict, num_samples: int) -> np.ndarray:
  """Per held-out prompt of the run's prompt file, the reference's pass rate over `num_samples` samples.

  The prompts are encoded and padded as the run encodes them (`PromptIterator`); padding is told by the masks.
  """
  params, model_config = hf.load_checkpoint(config["policy"]["path"])
  tokenizer = prompt_encoding.PromptTokenizer(hf.load_tokenizer(config["policy"]["path"]),
                                              chat_template=config["data"].get("chat_template", False))
  _, held_out = prompt_sources.load_prompt_splits("prompt_file", path=config["data"]["path"])
  batch = next(prompt_batches.PromptIterator(held_out, tokenizer, batch_size=len(held_out), shuffle=False,
                                             prompt_len=config["data"]["prompt_len"], name="held-out"))
  sample_config = sampling.SamplingConfig(
      max_new_tokens=config["sampling"]["max_new_tokens"], num_samples=num_samples, temperature=1.0, top_k=0,
      top_p=1.0, stop_token_ids=model_config.stop_token_ids)
  out = jax.jit(lambda p, t, m: sampling.sample(p, t, m, jax.random.PRNGKey(0), sample_config, model_config))(
      params, batch["prompts"], batch["prompt_mask"])
  generated, mask = np.asarray(out.tokens), np.asarray(out.mask)
  texts = tokenizer.batch_decode([row[keep].tolist() for rows, keeps in zip(generated, mask)
                                  for row, keep in zip(rows, keeps)], skip_special_tokens=True)
  passed = arithmetic.check([p for p in batch["text"] for _ in range(num_samples)], texts)
  return np.asarray(passed).reshape(len(held_out), num_samples).mean(axis=1)


def best_of_n_points(pass_rates: np.ndarray, ns: list[int]) -> list[tuple[int, float, float]]:
  """`[(N, KL(π_BoN || π_ref), pass rate)]` averaged over prompts, exact for a right/wrong reward."""
  p = pass_rates[:, None]
  q = 1 - (1 - p) ** np.asarray(ns)[None, :]
  with np.errstate(divide="ignore", invalid="ignore"):  # p = 0 or 1: Best-of-N equals the reference there.
    kl = np.where(q > 0, q * np.log(q / p), 0.0) + np.where(q < 1, (1 - q) * np.log((1 - q) / (1 - p)), 0.0)
  return [(n, float(k), float(r)) for n, k, r in zip(ns, kl.mean(axis=0), q.mean(axis=0))]


def main(argv):
  del argv
  workdir = paths.as_path(_WORKDIR.value)  # Local or in a bucket.
  run_dir = lambda method, seed: workdir / method / f"seed{seed}"
  curves = {m: mean_curve([read_eval_curve(run_dir(m, s)) for s in _SEEDS.value]) for m in _METHODS.value}
  config = json.loads((run_dir(_METHODS.value[0], _SEEDS.value[0]) / "config.json").read_text())
  bon = best_of_n_points(reference_pass_rates(config, _BON_SAMPLES.value), [int(n) for n in _BON_NS.value])

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for method, curve in curves.items():
    _, kls, rates, _ = zip(*curve)
    ax.plot(kls, rates, marker="o", markersize=3, label=LABELS.get(method, method))
  _, bon_kls, bon_rates = zip(*bon)
  ax.plot(bon_kls, bon_rates, "k--", marker="s", label="Best-of-N of the reference (exact)")
  for n, kl, rate in bon:
    ax.annotate(f"N={n}", (kl, rate), textcoords="offset points", xytext=(6, -10), fontsize=8)
  ax.set_xlabel("KL(π || π_ref), nats (held-out prompts)")
  ax.set_ylabel("pass rate (held-out prompts)")
  ax.set_title(f"Addition, right/wrong reward: pass rate vs KL over training ({len(_SEEDS.value)} seeds)")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  fig.tight_layout()
  png = workdir / "verifiable.png"
  with png.open("wb") as f:
    fig.savefig(f, format="png", dpi=120)

  summary = {"seeds": _SEEDS.value,
             "runs": {m: [{"step": s, "kl_to_ref": k, "pass_rate": r, "pass_rate_se": e} for s, k, r, e in c]
                      for m, c in curves.items()},
             "best_of_n": [{"n": n, "kl_to_ref": k, "pass_rate": r} for n, k, r in bon]}
  paths.write_whole(workdir / "verifiable.json", json.dumps(summary, indent=2))
  print(f"{'':<18} {'KL(.||ref)':>10} {'pass rate':>10} {'± s.e.':>7}")
  for method, curve in curves.items():
    print(f"{method:<18} {curve[-1][1]:>10.3f} {curve[-1][2]:>10.3f} {curve[-1][3]:>7.3f}")
  for n, kl, rate in bon:
    print(f"{'best_of_' + str(n):<18} {kl:>10.3f} {rate:>10.3f}")
  print(f"wrote {png}")


if __name__ == "__main__":
  app.run(main)
