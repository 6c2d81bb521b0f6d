"""Hugging Face safetensors in and out (`experiments.hf_io`), with hand-made tensors (no torch)."""

import json
import os
import re

import ml_dtypes
import numpy as np
import pytest

safetensors_numpy = pytest.importorskip("safetensors.numpy")

from experiments import hf_io  # pylint: disable=wrong-import-position
from experiments.models import llama  # pylint: disable=wrong-import-position

CONFIG = llama.LlamaConfig(vocab_size=10, hidden_size=8, intermediate_size=12, num_layers=2,
                           num_heads=2, num_kv_heads=1, flavour="qwen2")
HF_CONFIG = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": 10,
             "hidden_size": 8, "intermediate_size": 12, "num_hidden_layers": 2,
             "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-6,
             "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu"}


def _torch_layout(seed=0):
  """Every tensor of CONFIG by its Hugging Face name, in torch's (out, in) layout, by hand."""
  rng = np.random.default_rng(seed)
  shapes = {"model.embed_tokens.weight": (10, 8), "model.norm.weight": (8,),
            "lm_head.weight": (10, 8)}
  for n in range(2):
    p = f"model.layers.{n}."
    shapes.update({
        p + "input_layernorm.weight": (8,), p + "post_attention_layernorm.weight": (8,),
        p + "self_attn.q_proj.weight": (8, 8), p + "self_attn.q_proj.bias": (8,),
        p + "self_attn.k_proj.weight": (4, 8), p + "self_attn.k_proj.bias": (4,),
        p + "self_attn.v_proj.weight": (4, 8), p + "self_attn.v_proj.bias": (4,),
        p + "self_attn.o_proj.weight": (8, 8), p + "mlp.gate_proj.weight": (12, 8),
        p + "mlp.up_proj.weight": (12, 8), p + "mlp.down_proj.weight": (8, 12)})
  return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _write(directory, tensors, dtype=np.float32, hf_config=HF_CONFIG, shards=1):
  os.makedirs(directory, exist_ok=True)
  names = sorted(tensors)
  if shards == 1:
    safetensors_numpy.save_file({n: tensors[n].astype(dtype) for n in names},
                                os.path.join(directory, "model.safetensors"))
  else:
    weight_map = {}
    for i in range(shards):
      file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
      part = names[i::shards]
      safetensors_numpy.save_file({n: tensors[n].astype(dtype) for n in part},
                                  os.path.join(directory, file))
      weight_map.update({n: file for n in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
      json.dump({"metadata": {}, "weight_map": weight_map}, f)
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config, f)
  return str(directory)


@pytest.mark.parametrize("dtype,shards", [(np.float32, 1), (ml_dtypes.bfloat16, 3),
                                          (np.float16, 1)])
def test_load_transposes_linear_weights_and_reads_every_dtype_and_shard_layout(tmp_path, dtype,
                                                                                shards):
  tensors = _torch_layout()
  config, params, hf, stored = hf_io.load(_write(tmp_path / "in", tensors, dtype, shards=shards))
  assert config == CONFIG and hf == HF_CONFIG
  assert stored == {np.float32: "float32", ml_dtypes.bfloat16: "bfloat16",
                    np.float16: "float16"}[dtype]
  cast = lambda name: tensors[name].astype(dtype).astype(np.float32)
  attention = params["layers"][1]["self_attn"]
  np.testing.assert_array_equal(attention["k_proj"]["kernel"],
                                cast("model.layers.1.self_attn.k_proj.weight").T)
  np.testing.assert_array_equal(attention["k_proj"]["bias"],
                                cast("model.layers.1.self_attn.k_proj.bias"))
  np.testing.assert_array_equal(params["layers"][0]["mlp"]["down_proj"]["kernel"],
                                cast("model.layers.0.mlp.down_proj.weight").T)
  np.testing.assert_array_equal(params["lm_head"]["kernel"], cast("lm_head.weight").T)
  np.testing.assert_array_equal(params["embed_tokens"]["embedding"],
                                cast("model.embed_tokens.weight"))
  assert attention["k_proj"]["kernel"].dtype == np.float32


@pytest.mark.parametrize("dtype,shard_bytes", [("bfloat16", 400), ("float32", None)])
def test_save_writes_the_torch_layout_back_bit_for_bit(tmp_path, dtype, shard_bytes):
  tensors = {n: v.astype(hf_io.DTYPES[hf_io.DTYPE_NAMES[dtype]]).astype(np.float32)
             for n, v in _torch_layout().items()}
  config, params, hf, _ = hf_io.load(_write(tmp_path / "in", tensors))
  (tmp_path / "in" / "tokenizer.json").write_text("{}")
  files = hf_io.save(str(tmp_path / "out"), config, params, dtype=dtype, hf_config=hf,
                     max_shard_bytes=shard_bytes, copy_from=str(tmp_path / "in"))
  assert "tokenizer.json" in files and "config.json" in files
  assert sorted(os.listdir(tmp_path)) == ["in", "out"]   # no temporary left
  written = {}
  for file in files:
    if file.endswith(".safetensors"):
      written.update(safetensors_numpy.load_file(str(tmp_path / "out" / file)))
  assert set(written) == set(tensors)
  for name, value in tensors.items():
    assert written[name].dtype == hf_io.DTYPES[hf_io.DTYPE_NAMES[dtype]], name
    np.testing.assert_array_equal(written[name].astype(np.float32), value, err_msg=name)
  if shard_bytes:
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tensors) and len(set(index["weight_map"].values())) > 1
  again = hf_io.load(str(tmp_path / "out"))
  assert again[0] == config and again[3] == dtype


def test_inspect_takes_the_dtype_from_the_tensor_headers_and_reports_config_json_disagreeing(
    tmp_path):
  stale = {**HF_CONFIG, "torch_dtype": "float32"}
  checkpoint = hf_io.inspect(_write(tmp_path / "a", _torch_layout(), ml_dtypes.bfloat16,
                                    hf_config=stale))
  assert checkpoint.dtype == "bfloat16"
  assert checkpoint.mismatch == (f"{tmp_path / 'a'}: config.json says dtype 'float32' but the "
                                 "tensors are stored as bfloat16: bfloat16 is used.")
  agreeing = {**HF_CONFIG, "dtype": "bfloat16"}
  checkpoint = hf_io.inspect(_write(tmp_path / "b", _torch_layout(), ml_dtypes.bfloat16,
                                    hf_config=agreeing))
  assert (checkpoint.dtype, checkpoint.mismatch) == ("bfloat16", None)
  # Norms kept in float32, the rest float16: the dtype of most entries, and the mix reported.
  tensors = _torch_layout()
  mixed = {n: v.astype(np.float32 if "norm" in n else np.float16) for n, v in tensors.items()}
  directory = str(tmp_path / "c")
  os.makedirs(directory)
  safetensors_numpy.save_file(mixed, os.path.join(directory, "model.safetensors"))
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(HF_CONFIG, f)
  checkpoint = hf_io.inspect(directory)
  norms = sum(v.size for n, v in tensors.items() if "norm" in n)
  total = sum(v.size for v in tensors.values())
  assert checkpoint.dtype == "float16"
  assert checkpoint.mismatch == (f"{directory}: the tensors mix dtypes (float16 "
                                 f"{1 - norms / total:.1%}, float32 {norms / total:.1%} of the "
                                 "entries): the checkpoint's dtype is taken as float16.")


def test_per_layer_widths_export_only_when_every_layer_has_the_same(tmp_path):
  same = llama.LlamaConfig(**{**CONFIG.__dict__, "layer_kv_heads": (1, 1),
                              "layer_intermediate_sizes": (6, 6)})
  hf = hf_io.config_to_hf(same)
  assert (hf["intermediate_size"], hf["num_key_value_heads"], hf["num_attention_heads"]) == (
      6, 1, 2)
  assert hf_io.tensor_table(same)["model.layers.1.mlp.down_proj.weight"][1] == (8, 6)
  differ = llama.LlamaConfig(**{**CONFIG.__dict__, "layer_intermediate_sizes": (6, 12)})
  assert hf_io.tensor_table(differ)["model.layers.1.mlp.down_proj.weight"][1] == (8, 12)
  with pytest.raises(hf_io.HFError, match=r"the layers have different widths \(key/value heads "
                     r"\(\), MLP \(6, 12\)\); a Hugging Face config has one"):
    hf_io.Writer(str(tmp_path / "out"), differ)
  assert not (tmp_path / "out").exists()


def test_tied_embeddings_have_no_lm_head(tmp_path):
  tensors = _torch_layout()
  del tensors["lm_head.weight"]
  config, params, _, _ = hf_io.load(_write(tmp_path / "in", tensors,
                                           hf_config={**HF_CONFIG, "tie_word_embeddings": True}))
  assert config.tie_embeddings and "lm_head" not in params
  hf_io.save(str(tmp_path / "out"), config, params)
  assert "lm_head.weight" not in safetensors_numpy.load_file(
      str(tmp_path / "out" / "model.safetensors"))


def _error(tmp_path, match, tensors=None, **kwargs):
  directory = _write(tmp_path / "bad", tensors or _torch_layout(), **kwargs)
  with pytest.raises(hf_io.HFError, match=match) as info:
    hf_io.load(directory)
  assert "\n" not in str(info.value)


def test_unsupported_architecture_and_fields_are_named(tmp_path):
  _error(tmp_path, r"config.json: architectures=\['GemmaForCausalLM'\].*not supported",
         hf_config={**HF_CONFIG, "architectures": ["GemmaForCausalLM"], "model_type": "gemma"})
  _error(tmp_path, r"rope type 'linear'",
         hf_config={**HF_CONFIG, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
  _error(tmp_path, r"field 'hidden_size' is missing",
         hf_config={k: v for k, v in HF_CONFIG.items() if k != "hidden_size"})


def test_missing_unexpected_misshapen_and_wrong_dtype_tensors_are_named(tmp_path):
  tensors = _torch_layout()
  del tensors["model.layers.1.mlp.up_proj.weight"]
  _error(tmp_path / "a", r"tensor model.layers.1.mlp.up_proj.weight is missing", tensors)
  tensors = {**_torch_layout(), "model.layers.0.self_attn.o_proj.bias": np.zeros(8, np.float32)}
  _error(tmp_path / "b", r"unexpected tensor model.layers.0.self_attn.o_proj.bias", tensors)
  tensors = {**_torch_layout(), "model.layers.0.self_attn.k_proj.weight": np.zeros((8, 8),
                                                                                    np.float32)}
  _error(tmp_path / "c", r"tensor model.layers.0.self_attn.k_proj.weight has shape \(8, 8\), "
         r"config.json implies \(4, 8\)", tensors)
  _error(tmp_path / "d", r"tensor \S+ has dtype I8", dtype=np.int8)


def test_a_failed_save_leaves_nothing(tmp_path):
  config, params, _, _ = hf_io.load(_write(tmp_path / "in", _torch_layout()))
  del params["layers"][1]["mlp"]["up_proj"]
  with pytest.raises(hf_io.HFError, match="params have no layers/1/mlp/up_proj/kernel"):
    hf_io.save(str(tmp_path / "out"), config, params)
  params = hf_io.load(str(tmp_path / "in"))[1]
  params["layers"][0]["self_attn"]["q_proj"]["kernel"] = np.zeros((8, 4), np.float32)
  with pytest.raises(hf_io.HFError, match=r"layers/0/self_attn/q_proj/kernel \(tensor "
                     r"model.layers.0.self_attn.q_proj.weight\) has shape \(8, 4\)"):
    hf_io.save(str(tmp_path / "out"), config, params)
  with pytest.raises(hf_io.HFError, match="dtype='int8'"):
    hf_io.save(str(tmp_path / "out"), config, params, dtype="int8")
  assert sorted(os.listdir(tmp_path)) == ["in"]
  with pytest.raises(hf_io.HFError, match="exists and is not empty"):
    hf_io.save(str(tmp_path / "in"), config, hf_io.load(str(tmp_path / "in"))[1])


def _hf_config(model_path, **overrides):
  from experiments.configs import oneshot_hf  # pylint: disable=g-import-not-at-top
  config = oneshot_hf.get_config()
  config.model_path = model_path
  config.calibration_sequences, config.sequence_length = 4, 8
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.mark.slow
def test_hf_oneshot_writes_a_2_4_checkpoint_in_the_source_layout(tmp_path):
  from experiments import oneshot  # pylint: disable=g-import-not-at-top
  source = _write(tmp_path / "in", _torch_layout(), ml_dtypes.bfloat16)
  lines = []
  result = oneshot.run(_hf_config(source, method="magnitude", pattern=(2, 4)),
                       str(tmp_path / "out"), log=lines.append)
  assert [line.split(":")[0] for line in lines[1:3]] == ["[hf_oneshot] block 1/2",
                                                         "[hf_oneshot] block 2/2"]
  assert result["dtype"] == "bfloat16" and result["block_sparsity"] == 0.5
  files = hf_io.weight_files(str(tmp_path / "out"))   # the embeddings and head, then a shard per block
  assert len(set(files.values())) == 3
  assert files["model.layers.1.mlp.up_proj.weight"].endswith("model-00003-of-00003.safetensors")
  written = {}
  for file in set(files.values()):
    written.update(safetensors_numpy.load_file(file))
  dense = _torch_layout()
  for name, value in written.items():
    assert value.dtype == ml_dtypes.bfloat16
    if name.startswith("model.layers.") and name.endswith("proj.weight"):
      groups = (value.astype(np.float32).reshape(value.shape[0], -1, 4) != 0).sum(-1)
      assert (groups == 2).all(), name
      # magnitude: the two largest |w| of each group of 4 inputs survive, unchanged
      expected = dense[name].astype(ml_dtypes.bfloat16).astype(np.float32).reshape(
          value.shape[0], -1, 4)
      top = np.argsort(-np.abs(expected), axis=-1, kind="stable")[..., :2]
      kept = np.zeros_like(expected, bool)
      np.put_along_axis(kept, top, True, axis=-1)
      np.testing.assert_array_equal(value.astype(np.float32).reshape(expected.shape),
                                    np.where(kept, expected, 0), err_msg=name)
    else:   # embeddings, norms, biases, head: as they were
      np.testing.assert_array_equal(value, dense[name].astype(ml_dtypes.bfloat16), err_msg=name)


def test_hf_oneshot_checks_every_kernel_before_writing_anything(tmp_path):
  from experiments import config_checks  # pylint: disable=g-import-not-at-top
  from experiments import hf_oneshot  # pylint: disable=g-import-not-at-top
  source = _write(tmp_path / "in", _torch_layout())
  with pytest.raises(config_checks.ConfigError, match=r"config.pattern: .*kernel of shape "
                     r"\(8, \d+\) has 8 inputs .* not divisible by M=3"):
    hf_oneshot.run(_hf_config(source, method="magnitude", pattern=(1, 3)), str(tmp_path / "out"))
  with pytest.raises(config_checks.ConfigError, match=r"config.block_size: sparsegpt N:M 1:4 "
                     r"needs block_size \(6\) divisible by M=4"):
    hf_oneshot.run(_hf_config(source, pattern=(1, 4), block_size=6), str(tmp_path / "out"))
  with pytest.raises(config_checks.ConfigError, match=r"config.model_path: .*tensor "
                     r"model.layers.0.mlp.up_proj.weight is missing"):
    tensors = _torch_layout()
    del tensors["model.layers.0.mlp.up_proj.weight"]
    hf_oneshot.run(_hf_config(_write(tmp_path / "bad", tensors)), str(tmp_path / "out"))
  assert sorted(os.listdir(tmp_path)) == ["bad", "in"]


def test_a_calibration_file_with_fewer_tokens_than_needed_is_an_error_naming_it(tmp_path):
  from experiments import config_checks  # pylint: disable=g-import-not-at-top
  from experiments import hf_oneshot  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "tokens.npy")
  ids = np.arange(60).reshape(6, 10) % 10
  np.save(path, ids)
  config = _hf_config("unused", calibration=path)            # 4 sequences x 8 tokens
  np.testing.assert_array_equal(hf_oneshot.calibration_tokens(config, 10), ids[:4, :8])
  for shape, has in (((3, 10), r"3 x 10 \(30\)"), ((6, 5), r"6 x 5 \(30\)")):
    np.save(path, np.zeros(shape, np.int64))
    with pytest.raises(config_checks.ConfigError, match=(
        rf"config.calibration='{re.escape(path)}': needs 4 sequences x 8 tokens \(32 tokens: "
        rf"calibration_sequences x sequence_length\), has {has}")) as raised:
      hf_oneshot.calibration_tokens(config, 10)
    assert "\n" not in str(raised.value)

