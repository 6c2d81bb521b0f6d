"""One-shot pruning of a local Hugging Face checkpoint (Llama / Qwen2 / Qwen3 safetensors).

  python -m experiments.hf_oneshot --config=experiments/configs/oneshot_hf.py \
      --config.model_path=<checkpoint dir> --workdir=<output dir> [--config.pattern=2,4]

(`python -m experiments.oneshot` takes the same config.) SparseGPT at 50%
unstructured sparsity by default, blocks of 128 columns, dampening 1% of the
mean diagonal of X^T X; every linear layer of the decoder blocks pruned, the
embeddings and the output head dense; the papers' 128 calibration sequences,
here of 256 tokens drawn uniformly at random unless `calibration` names
'stdlib_text' (byte vocabularies) or a .npy file of token ids.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model_path = ""            # dir with config.json and model*.safetensors (+ index)
  config.method = "sparsegpt"       # magnitude | wanda | sparsegpt
  config.sparsity = 0.5             # unstructured, of every block kernel (ignored with pattern)
  config.pattern = ()               # (N, M), e.g. --config.pattern=2,4: N:M along the inputs
  config.calibration = "random"     # 'random' | 'stdlib_text' | path of a .npy of token ids
  config.calibration_sequences = 128
  config.sequence_length = 256
  config.calibration_batch = 16     # sequences per forward pass
  config.seed = 0                   # which calibration sequences
  config.block_size = 128           # sparsegpt: columns per lazy-update block
  config.dampening = 0.01           # sparsegpt: lambda as a fraction of mean diag(X^T X)
  config.dtype = ""                 # written dtype: '' the checkpoint's, or bfloat16/float16/float32
  return config
