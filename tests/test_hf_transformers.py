"""Hugging Face checkpoints against `transformers` itself (pip install -e ".[hf]": CPU torch).

Tiny random Llama and Qwen2 models are built and saved with `transformers`
(`save_pretrained`, offline), imported by `experiments.hf_io` and compared
logit for logit; then pruned by `experiments.hf_oneshot` (SparseGPT 2:4),
exported, and loaded back by `transformers`.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from experiments import hf_io  # pylint: disable=wrong-import-position
from experiments import hf_oneshot  # pylint: disable=wrong-import-position
from experiments.configs import oneshot_hf  # pylint: disable=wrong-import-position

pytestmark = [pytest.mark.hf, pytest.mark.slow]

SIZES = dict(vocab_size=37, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6)
KINDS = {
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {}),
    # Qwen2: q/k/v biases; tied embeddings (no lm_head.weight in the file).
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
              {"tie_word_embeddings": True}),
    # Qwen3: RMSNorm of every query and key head.
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {}),
}
TOKENS = np.array([[1, 5, 9, 3, 30, 2, 7, 7, 11], [0, 36, 4, 4, 18, 25, 6, 13, 2]])


def _saved(kind, directory, dtype=torch.float32):
  config_cls, model_cls, extra = KINDS[kind]
  torch.manual_seed(0)
  model = model_cls(config_cls(**SIZES, **extra)).eval()
  with torch.no_grad():   # weights far from their init, norm weights and biases included
    for p in model.parameters():
      p.normal_(1.0 if p.ndim == 1 else 0.0, 0.3)
  model.to(dtype).save_pretrained(directory)
  return model


def _torch_logits(model):
  with torch.no_grad():
    return model.float()(torch.tensor(TOKENS)).logits.numpy()


def _ours(directory):
  config, params, _, _ = hf_io.load(directory)
  return np.asarray(hf_io.to_model(config, params)(jnp.asarray(TOKENS)))


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_imported_checkpoint_gives_the_logits_of_transformers(tmp_path, kind):
  model = _saved(kind, tmp_path / kind)
  np.testing.assert_allclose(_ours(str(tmp_path / kind)), _torch_logits(model), atol=1e-4,
                             rtol=1e-4)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sparsegpt_2_4_export_loads_in_transformers_with_the_same_logits(tmp_path, kind):
  source, out = str(tmp_path / "dense"), str(tmp_path / "pruned")
  _saved(kind, source)
  config = oneshot_hf.get_config()
  config.model_path = source
  config.pattern = (2, 4)
  config.calibration_sequences, config.sequence_length, config.calibration_batch = 8, 16, 8
  lines = []
  hf_oneshot.run(config, out, log=lines.append)
  assert sum(line.startswith("[hf_oneshot] block ") for line in lines) == 2
  assert os.path.exists(os.path.join(out, hf_io.INDEX_FILE))   # a shard per block, streamed
  assert sorted(os.listdir(tmp_path)) == ["dense", "pruned"]
  pruned = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  np.testing.assert_allclose(_ours(out), _torch_logits(pruned), atol=1e-4, rtol=1e-4)
  dense_logits = _torch_logits(transformers.AutoModelForCausalLM.from_pretrained(source))
  assert np.abs(_torch_logits(pruned) - dense_logits).max() > 1e-3   # it did prune
  names = [n for n, _ in pruned.named_parameters() if n.startswith("model.layers.")
           and n.endswith("proj.weight")]
  assert len(names) == 2 * 7
  for name in names:
    weight = pruned.get_parameter(name).detach().numpy()   # (out, in): groups of 4 inputs
    groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
    assert (groups == 2).all(), name
  embedding = pruned.get_parameter("model.embed_tokens.weight").detach().numpy()
  assert (embedding != 0).all()   # embeddings and head stay dense


def test_bfloat16_checkpoint_round_trips_bit_for_bit(tmp_path):
  model = _saved("llama", tmp_path / "bf16", torch.bfloat16)
  config, params, hf, dtype = hf_io.load(str(tmp_path / "bf16"))
  assert dtype == "bfloat16"
  hf_io.save(str(tmp_path / "again"), config, params, dtype=dtype, hf_config=hf)
  again = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "again"))
  assert again.dtype == torch.bfloat16
  for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
    assert torch.equal(a, b), name
