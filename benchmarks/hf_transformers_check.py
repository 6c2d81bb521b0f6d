"""A Hugging Face checkpoint of a byte-level model in sparsejax and in `transformers`, side by side.

  python benchmarks/hf_transformers_check.py runs/llama_hf runs/llama_hf_2of4 [--sequences=256]

For each checkpoint directory: loads it with `experiments.hf_io` (the NNX
`Llama`) and with `transformers.AutoModelForCausalLM` (CPU torch, float32),
runs both on the first `--sequences` test sequences of the bundled
`stdlib_text` data (256 bytes each, byte tokens), and prints the largest
logit difference, both models' test bits per byte, and the fraction of the
blocks' linear weights that are zero in the checkpoint transformers loaded.
Needs `pip install -e ".[hf]"`.
"""

import argparse
import math
import os
import sys

import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments import hf_io  # pylint: disable=wrong-import-position
from experiments import stdlib_text  # pylint: disable=wrong-import-position


def bits_per_byte(logits: np.ndarray, targets: np.ndarray) -> float:
  """Mean next-byte cross-entropy in bits, from float64 log-softmax."""
  logits = logits.astype(np.float64)
  logits = logits - logits.max(-1, keepdims=True)
  log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  return float(-np.take_along_axis(log_p, targets[..., None], -1).mean() / math.log(2))


def main() -> None:
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser()
  parser.add_argument("checkpoints", nargs="+")
  parser.add_argument("--sequences", type=int, default=256)
  parser.add_argument("--batch", type=int, default=32)
  args = parser.parse_args()
  data = stdlib_text.chunks(stdlib_text.split_bytes(stdlib_text.source_files()["test"]))
  data = data[:args.sequences].astype(np.int64)
  inputs, targets = data[:, :-1], data[:, 1:]
  for directory in args.checkpoints:
    config, params, _, dtype = hf_io.load(directory)
    ours_model = hf_io.to_model(config, params)
    theirs_model = transformers.AutoModelForCausalLM.from_pretrained(directory).float().eval()
    ours, theirs = [], []
    for i in range(0, len(inputs), args.batch):
      batch = inputs[i:i + args.batch]
      ours.append(np.asarray(ours_model(jnp.asarray(batch, jnp.int32))))
      with torch.no_grad():
        theirs.append(theirs_model(torch.tensor(batch)).logits.numpy())
    ours, theirs = np.concatenate(ours), np.concatenate(theirs)
    weights = [p.detach().numpy() for n, p in theirs_model.named_parameters()
               if n.startswith("model.layers.") and n.endswith("proj.weight")]
    zero = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    print(f"{directory} ({dtype}): max |logit difference| {np.abs(ours - theirs).max():.2e} "
          f"(max |logit| {np.abs(theirs).max():.1f}); test bits per byte on {len(inputs)} "
          f"sequences: sparsejax {bits_per_byte(ours, targets):.4f}, transformers "
          f"{bits_per_byte(theirs, targets):.4f}; block weights zero: {zero:.2%}")


if __name__ == "__main__":
  main()
