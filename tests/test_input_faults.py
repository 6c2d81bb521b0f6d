"""Faults around the input pipeline and process start-up: each ends in one line
naming the file or port, or, for a killed trainer, in no leftover process."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds

from experiments import distributed
from experiments import input_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict:
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _children(pid: int) -> list[int]:
  """The processes whose parent is `pid` (from /proc)."""
  out = []
  for entry in os.listdir("/proc"):
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          stat = f.read()
      except OSError:
        continue
      if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
        out.append(int(entry))
  return out


def _running(pid: int) -> bool:
  """Alive and not a zombie (a dead child not yet reaped by its new parent)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except OSError:
    return False


TRAINER = textwrap.dedent("""
    import sys, time
    from experiments import input_pipeline
    data = input_pipeline.load("sklearn_digits", sys.argv[1])
    batches = input_pipeline.train_batches(data, 32, 0, 0, 1000, worker_count=2, prefetch=2)
    next(batches)
    print("ready", flush=True)
    time.sleep(600)
""")


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_grain_workers_exit_when_the_trainer_is_killed(digits_dir):
  trainer = subprocess.Popen([sys.executable, "-c", TRAINER, digits_dir], env=_env(),
                             stdout=subprocess.PIPE, text=True)
  workers = []
  try:
    assert trainer.stdout.readline().strip() == "ready"
    workers = _children(trainer.pid)
    assert len([w for w in workers if _running(w)]) >= 2  # the two workers (and a tracker)
    os.kill(trainer.pid, signal.SIGKILL)
    trainer.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(_running(w) for w in workers):
      time.sleep(0.1)
    survivors = [w for w in workers if _running(w)]
    assert not survivors, f"processes {survivors} outlived the killed trainer"
  finally:
    trainer.kill()
    for w in workers:
      if _running(w):
        os.kill(w, signal.SIGKILL)


# Damaged datasets: a copy of the bundled digits with one file broken.

VERSION_DIR = os.path.join("sklearn_digits", "1.0.0")
TRAIN_SHARD = "sklearn_digits-train.array_record-00000-of-00001"
DIGITS_MEAN, DIGITS_STD = (0.3,), (0.4,)  # given: load() then reads no example beyond the first


def _damage(path: str, how: str) -> None:
  with open(path, "rb") as f:
    data = f.read()
  if how == "delete":
    os.remove(path)
    return
  if how == "truncate":
    data = data[:len(data) // 2]
  elif how == "empty":
    data = b""
  elif how == "flip":  # one byte in the middle: inside a chunk of records or its header
    data = data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:]
  with open(path, "wb") as f:
    f.write(data)


@pytest.fixture
def damaged_digits(digits_dir, tmp_path):
  """(data_dir, path) of a copy of the digits with the file `name` damaged `how`."""

  def make(name: str, how: str) -> tuple[str, str]:
    data_dir = str(tmp_path / "tfds")
    shutil.copytree(digits_dir, data_dir)
    path = os.path.join(data_dir, VERSION_DIR, name)
    _damage(path, how)
    return data_dir, path

  return make


@pytest.mark.parametrize("how", ["truncate", "empty", "flip", "delete"])
def test_damaged_dataset_info_is_one_line_naming_the_file(damaged_digits, how):
  data_dir, path = damaged_digits("dataset_info.json", how)
  with pytest.raises(input_pipeline.DatasetError) as e:
    input_pipeline.load("sklearn_digits", data_dir)
  message = str(e.value)
  assert path in message and len(message.splitlines()) == 1, message
  assert ("is missing" if how == "delete" else "is damaged") in message


@pytest.mark.parametrize("how", ["truncate", "empty", "flip", "delete"])
def test_damaged_array_record_shard_is_one_line_naming_the_file(damaged_digits, how):
  data_dir, path = damaged_digits(TRAIN_SHARD, how)
  with pytest.raises(input_pipeline.DatasetError) as e:
    data = input_pipeline.load("sklearn_digits", data_dir, mean=DIGITS_MEAN, std=DIGITS_STD)
    input_pipeline.read_split(data, "train")
  message = str(e.value)
  assert f"Dataset file {path} is damaged, truncated or missing" in message, message
  assert len(message.splitlines()) == 1, message


def test_undamaged_split_reads_the_same_through_the_checked_reads(digits_dir):
  """The checked reads change nothing: the digits equal scikit-learn's, by label counts and pixels."""
  sklearn_datasets = pytest.importorskip("sklearn.datasets")
  digits = sklearn_datasets.load_digits()
  data = input_pipeline.load("sklearn_digits", digits_dir, mean=(0.0,), std=(1.0 / 255,))
  train, test = input_pipeline.read_split(data, "train"), input_pipeline.read_split(data, "eval")
  images = np.concatenate([train[0], test[0]])[..., 0]
  labels = np.concatenate([train[1], test[1]])
  np.testing.assert_array_equal(np.bincount(labels), np.bincount(digits.target))
  ours = sorted(map(bytes, np.round(images).astype(np.uint8).reshape(len(images), -1)))
  scaled = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
  theirs = sorted(map(bytes, scaled.reshape(len(images), -1)))
  assert ours == theirs


WORKER_READ = textwrap.dedent("""
    import sys
    from experiments import input_pipeline
    if __name__ == "__main__":
      data = input_pipeline.load("sklearn_digits", sys.argv[1], mean=(0.3,), std=(0.4,))
      try:
        for _ in input_pipeline.train_batches(data, 128, 0, 0, 40, worker_count=2):
          pass
      except input_pipeline.DatasetError as e:
        print("DatasetError:", e)
""")


@pytest.mark.slow
def test_damaged_shard_read_by_a_grain_worker_reaches_the_trainer_as_dataset_error(
    damaged_digits):
  data_dir, path = damaged_digits(TRAIN_SHARD, "flip")
  script = os.path.join(os.path.dirname(data_dir), "read.py")
  with open(script, "w") as f:
    f.write(WORKER_READ)
  out = subprocess.run([sys.executable, script, data_dir], env=_env(), capture_output=True,
                       text=True, timeout=300)
  assert f"DatasetError: Dataset file {path} is damaged" in out.stdout, out.stdout + out.stderr


@pytest.mark.slow
def test_train_binary_reports_a_damaged_shard_in_one_line(damaged_digits, tmp_path):
  data_dir, path = damaged_digits(TRAIN_SHARD, "truncate")
  out = subprocess.run(
      [sys.executable, "-m", "experiments.train", "--config=experiments/configs/default.py",
       f"--workdir={tmp_path / 'run'}", f"--config.data_dir={data_dir}"],
      cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
  assert out.returncode == 1
  assert "Traceback" not in out.stderr, out.stderr
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith(f"error: Dataset file {path} is damaged, truncated or missing"), last


# A multi-process start whose coordinator port is taken.


def _listener(host: str = "127.0.0.1") -> socket.socket:
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  s = socket.socket(family, socket.SOCK_STREAM)
  s.bind((host, 0))
  s.listen()
  return s


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::"])
def test_coordinator_port_in_use_is_named_before_jax_starts(host):
  if ":" in host and not socket.has_ipv6:
    pytest.skip("no IPv6")
  with _listener(host) as busy:
    port = busy.getsockname()[1]
    with pytest.raises(distributed.StartupError) as e:
      distributed.check_port_free(f"localhost:{port}")
  message = str(e.value)
  assert f"The coordinator port {port} (--coordinator_address=localhost:{port}) is in use" \
      in message and len(message.splitlines()) == 1, message


def test_a_port_left_in_time_wait_by_an_earlier_run_is_free():
  """An earlier coordinator's port (gRPC sets SO_REUSEADDR) is free again: gRPC binds it."""
  with socket.socket() as server:
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    conn, _ = server.accept()
    conn.close()  # the server side closes first: its port goes to TIME_WAIT
    client.close()
  distributed.check_port_free(f"127.0.0.1:{port}")  # no error


def test_initialization_timeout_must_be_positive():
  with pytest.raises(ValueError, match="--initialization_timeout must be positive, not 0"):
    distributed.initialize("127.0.0.1:1", 2, 1, initialization_timeout=0)


@pytest.mark.slow
def test_a_coordinator_port_in_use_ends_both_processes_in_one_line_each(digits_dir, tmp_path):
  timeout_s = 10
  with _listener() as busy:
    address = f"127.0.0.1:{busy.getsockname()[1]}"
    start = time.monotonic()
    processes = [subprocess.Popen(
        [sys.executable, "-m", "experiments.train", "--config=experiments/configs/default.py",
         f"--workdir={tmp_path / 'run'}", f"--config.data_dir={digits_dir}",
         f"--coordinator_address={address}", "--num_processes=2", f"--process_id={i}",
         "--cpu_devices=1", f"--initialization_timeout={timeout_s}"],
        cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
      outs = [p.communicate(timeout=120) for p in processes]
    finally:
      for p in processes:
        p.kill()
    elapsed = time.monotonic() - start
  for p, (_, err) in zip(processes, outs):
    assert p.returncode == 1 and "Traceback" not in err, err
  assert outs[0][1].strip().splitlines()[-1] == (
      f"error: The coordinator port {address.split(':')[1]} (--coordinator_address={address}) "
      "is in use on this host, by another program or run: choose a free port for every process.")
  assert outs[1][1].strip().splitlines()[-1].startswith(
      f"error: process 1 of 2 could not connect to the coordinator at {address} within "
      f"{timeout_s} s (--initialization_timeout)")
  assert elapsed < timeout_s + 60  # not JAX's 300 s


class ThreeShards(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """30 examples whose label is their own key, written as 3 shards of 10."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Tensor(shape=(2, 2, 1), dtype=np.uint8),
        "label": tfds.features.ClassLabel(num_classes=30)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(), "test": self._generate_examples()}

  def _generate_examples(self):
    for i in range(30):
      yield i, {"image": np.full((2, 2, 1), i, np.uint8), "label": i}


def test_the_error_names_the_damaged_one_of_several_shards(tmp_path, monkeypatch):
  monkeypatch.setitem(input_pipeline.BUNDLED, "three_shards", ThreeShards)
  builder = ThreeShards(data_dir=str(tmp_path), file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(num_shards=3))
  shards = sorted(str(p) for p in builder.data_path.glob("three_shards-train.array_record-*"))
  assert len(shards) == 3 and builder.info.splits["train"].shard_lengths == [10, 10, 10]
  data = input_pipeline.load("three_shards", str(tmp_path), mean=(0.0,), std=(1.0,),
                             cache_mb=0)  # no cache: batched reads across the shards
  _damage(shards[1], "empty")
  with pytest.raises(input_pipeline.DatasetError) as e:
    input_pipeline.read_split(data, "train")  # every example: the reads span the 3 shards
  message = str(e.value)
  assert f"Dataset file {shards[1]} is damaged" in message, message
  first = int(message.split("reading example ")[1].split()[0])
  assert 10 <= first < 20, message  # positions 10..19 of the split: the middle shard
