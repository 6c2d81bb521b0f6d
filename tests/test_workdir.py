"""What the binary may do with an existing workdir; nothing saved is lost silently."""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from experiments import config_checks
from experiments import metrics as metrics_lib
from experiments import train
from experiments import workdir as workdir_lib
from tests import one_device_env

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _snapshot(directory):
  """{relative path: bytes} of every file under `directory`."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, directory)] = f.read()
  return out


@pytest.fixture
def finished_run(tiny_config, tmp_path):
  tiny_config.num_train_steps = 12
  tiny_config.dense_baseline = False
  workdir = str(tmp_path / "run")
  summary = train.run(tiny_config, workdir)
  return tiny_config, workdir, summary


def test_different_config_is_refused_and_nothing_changes(finished_run):
  config, workdir, _ = finished_run
  before = _snapshot(workdir)
  config.pruning.sparsity = 0.7
  config.seed = 3
  with pytest.raises(workdir_lib.WorkdirError) as e:
    train.run(config, workdir)
  assert "pruning.sparsity: 0.8 -> 0.7" in str(e.value) and "seed: 0 -> 3" in str(e.value)
  assert "--overwrite" in str(e.value)
  assert _snapshot(workdir) == before


def test_finished_run_of_same_config_is_reported_not_retrained(finished_run):
  config, workdir, summary = finished_run
  before = _snapshot(workdir)
  assert train.run(config, workdir) == summary
  assert _snapshot(workdir) == before


def test_unfinished_run_of_same_config_resumes_from_its_last_checkpoint(finished_run):
  config, workdir, summary = finished_run
  os.remove(os.path.join(workdir, "final.json"))  # as if killed after the final checkpoint
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    metrics = f.read()
  resumed = train.run(config, workdir)
  for key in ("test", "train", "sparsity", "layers"):
    assert resumed[key] == summary[key], key
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert f.read() == metrics  # nothing retrained, nothing duplicated


def test_run_files_without_a_config_are_refused(tmp_path, tiny_config):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "metrics.jsonl").write_text("{}\n")
  with pytest.raises(workdir_lib.WorkdirError, match=r"holds run files \['metrics.jsonl'\] but no "
                                                     r"config.json"):
    train.run(tiny_config, str(workdir))
  assert (workdir / "metrics.jsonl").read_text() == "{}\n"


def test_overwrite_replaces_run_files_only(finished_run):
  config, workdir, _ = finished_run
  with open(os.path.join(workdir, "notes.txt"), "w") as f:
    f.write("mine")
  config.pruning.sparsity = 0.5
  summary = train.run(config, workdir, overwrite=True)
  assert abs(summary["sparsity"] - 0.5) < 0.005
  assert len(workdir_lib.load_json(workdir, "final.json")["layers"]) == 3
  with open(os.path.join(workdir, "notes.txt")) as f:
    assert f.read() == "mine"
  with open(os.path.join(workdir, "metrics.jsonl")) as f:  # old metrics gone, not appended to
    assert len([line for line in f if '"train"' in line]) == 2


def _cli(*args, cwd=ROOT):
  env = one_device_env(PYTHONPATH=ROOT)
  return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_cli_unknown_config_key_is_a_one_line_error(tmp_path):
  out = _cli("--config=experiments/configs/default.py", f"--workdir={tmp_path}",
             "--config.pruning.sparsty=0.5")
  assert out.returncode != 0
  assert out.stderr.strip().splitlines()[-1] == (
      "error: unknown config key --config.pruning.sparsty (the config has no such field): "
      '\'sparsty\'; Did you mean "sparsity" instead of "sparsty"?')
  assert not os.listdir(tmp_path)


def test_cli_runs_default_config_and_prints_final_line(digits_dir, tmp_path):
  # A relative --workdir, as in the README (Orbax itself needs absolute paths).
  out = _cli(f"--config={ROOT}/experiments/configs/default.py", "--workdir=runs/default",
             f"--config.data_dir={digits_dir}", "--config.num_epochs=6", "--config.log_every=22",
             "--config.checkpoint_every=44", "--config.pruning.update_every=5", cwd=tmp_path)
  assert out.returncode == 0, out.stderr
  assert sorted(os.listdir(tmp_path / "runs" / "default" / "checkpoints")) == ["44", "66"]
  last = out.stdout.strip().splitlines()[-1]
  match = re.fullmatch(r"dense test accuracy ([\d.]+) \| pruned test accuracy ([\d.]+) "
                       r"\| sparsity ([\d.]+) \(gradual, uniform\)", last)
  assert match, out.stdout
  dense, pruned, sparsity = map(float, match.groups())
  assert sparsity == 0.9  # 50200 prunable weights, each kernel's count divisible by 10
  assert dense > 0.8 and pruned > 0.5  # chance is 0.1
  assert "[gradual] step     66/66" in out.stdout


def test_resumed_metrics_drop_records_after_the_checkpoint_and_a_torn_last_line(tmp_path):
  lines = [{"step": 10, "split": "train", "loss": 1.0}, {"step": 20, "split": "train", "loss": 0.5}]
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in lines)
    f.write('{"step": 30, "split": "tr')  # the writer was killed mid-line
  logged = []
  with metrics_lib.MetricWriter(str(tmp_path), resume_step=10, log=logged.append) as writer:
    writer.write(20, "train", {"loss": 0.25})
  assert metrics_lib.read_metrics(str(tmp_path)) == [
      lines[0], {"step": 20, "split": "train", "loss": 0.25}]
  assert len(logged) == 1 and "line(s) [3] are not JSON records" in logged[0]


def test_a_garbled_metrics_line_is_named_on_read_and_kept_aside_on_resume(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    f.write('{"step": 10, "split": "train", "loss": 1.0}\n')
    f.write('{"step": 2\x00, "spl\n')  # damaged on disk, before the checkpoint's step
    f.write('{"step": 30, "split": "train", "loss": 0.5}\n')
  path = str(tmp_path / "metrics.jsonl")
  with pytest.raises(metrics_lib.MetricsError,
                     match=rf"^{re.escape(path)}, line 2, is not a JSON metrics record"):
    metrics_lib.read_metrics(str(tmp_path))
  logged = []
  metrics_lib.MetricWriter(str(tmp_path), resume_step=30, log=logged.append).close()
  assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path))] == [10, 30]
  assert "line(s) [2]" in logged[0] and metrics_lib.GARBLED_FILE in logged[0]
  with open(tmp_path / metrics_lib.GARBLED_FILE) as f:  # kept, with where it was
    assert f.read() == f'{path}:2: {{"step": 2\x00, "spl\n'


def test_cli_refuses_a_workdir_another_process_holds_in_one_line(finished_run):
  config, workdir, _ = finished_run
  code = ("import sys, time; from experiments import workdir as w; w.lock(sys.argv[1]); "
          "print('locked', flush=True); time.sleep(300)")
  holder = subprocess.Popen([sys.executable, "-c", code, workdir], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    before = _snapshot(workdir)
    out = _cli("--config=experiments/configs/default.py", f"--workdir={workdir}")
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert re.fullmatch(rf"error: Workdir {re.escape(workdir)} is in use by another run "
                        rf"\(pid {holder.pid} on host \S+\); wait for it to end or use another "
                        r"--workdir\.", last), last
    assert _snapshot(workdir) == before
  finally:
    holder.kill()  # SIGKILL: the OS releases the lock
    holder.wait()
  del config
  workdir_lib.lock(workdir)  # free again once the holder is gone


def test_overwrite_refuses_another_binarys_run_and_changes_nothing(tiny_config, tmp_path):
  workdir = str(tmp_path / "lottery_run")
  os.makedirs(os.path.join(workdir, "replicates", "seed_0"))
  for name in ("config.json", "final.json", "summary.csv", "lottery.png"):
    with open(os.path.join(workdir, name), "w") as f:
      f.write("{}")
  before = _snapshot(workdir)
  with pytest.raises(workdir_lib.WorkdirError, match=r"holds \['lottery.png', 'replicates', "
                                                     r"'summary.csv'\], written by another"):
    train.run(tiny_config, workdir, overwrite=True)
  assert _snapshot(workdir) == before


def test_cli_workdir_that_is_a_file_is_a_one_line_error(tmp_path):
  path = tmp_path / "a_file"
  path.write_text("mine")
  for workdir in (path, path / "sub"):
    out = _cli("--config=experiments/configs/default.py", f"--workdir={workdir}")
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == [
        f"error: Workdir {workdir}: {path} is a file, not a directory; choose another --workdir."]
  assert path.read_text() == "mine"


def test_a_workdir_that_is_not_writable_is_a_one_line_error():
  """As a user without write permission (nobody, when the tests run as root)."""
  parent = tempfile.mkdtemp()  # under /tmp, so that nobody can reach it
  try:
    os.chmod(parent, 0o755)
    locked = os.path.join(parent, "locked")
    os.mkdir(locked, 0o555)
    root = os.geteuid() == 0
    if root:
      os.seteuid(65534)
    try:
      with pytest.raises(workdir_lib.WorkdirError) as raised:
        workdir_lib.check_usable(os.path.join(locked, "run"))
    finally:
      if root:
        os.seteuid(0)
    assert re.fullmatch(rf"Workdir {re.escape(locked)}/run: {re.escape(locked)} is not writable "
                        r"by user \S+; choose a --workdir you can write to.", str(raised.value))
  finally:
    shutil.rmtree(parent)


def _test_records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if '"test"' in line]


def test_results_come_from_the_checkpoint_when_metrics_are_lost_or_garbled(finished_run, capsys):
  config, workdir, summary = finished_run
  tests = _test_records(workdir)  # evals at steps 11 and 12
  best = max(tests, key=lambda r: r["accuracy"])
  assert summary["best_test_accuracy"] == best["accuracy"]
  assert summary["best_step"] == best["step"]
  assert summary["test"]["accuracy"] == tests[-1]["accuracy"] and summary["test_step"] == 12
  # metrics.jsonl deleted before a resume: same results, and one line saying so.
  os.remove(os.path.join(workdir, "final.json"))
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  capsys.readouterr()
  resumed = train.run(config, workdir)
  for key in ("test", "train", "best_test_accuracy", "best_step", "test_step"):
    assert resumed[key] == summary[key], key
  lines = [l for l in capsys.readouterr().out.splitlines() if "is missing" in l]
  assert lines == [f"[gradual] {workdir}/metrics.jsonl is missing: the records up to step 12 "
                   "are lost; the results come from the checkpoint."]
  # The best record garbled on disk: the best stays what the checkpoint recorded.
  os.remove(os.path.join(workdir, "final.json"))
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    f.write(json.dumps({**best, "accuracy": 0.01}) + "\n" + '{"step": 1\x00\n')
  resumed = train.run(config, workdir)
  assert resumed["best_test_accuracy"] == best["accuracy"]
  assert resumed["test"] == summary["test"]


def test_each_binarys_named_outputs_are_in_its_declared_run_files():
  from experiments import lottery  # pylint: disable=g-import-not-at-top
  from experiments import lottery_report  # pylint: disable=g-import-not-at-top
  from experiments import nm_study  # pylint: disable=g-import-not-at-top
  from experiments import oneshot  # pylint: disable=g-import-not-at-top
  from experiments import sensitivity  # pylint: disable=g-import-not-at-top
  from experiments import trainer  # pylint: disable=g-import-not-at-top
  declared = workdir_lib.BINARY_RUN_FILES
  assert train.RUN_FILES == declared["experiments.train"] == workdir_lib.RUN_FILES
  assert {train.NM_EXPORT, train.CURVES_FILE, train.BASELINE_DIR, trainer.CHECKPOINT_DIR,
          metrics_lib.METRICS_FILE, metrics_lib.GARBLED_FILE,
          metrics_lib.TENSORBOARD_DIR} <= set(train.RUN_FILES)
  assert set(lottery.RUN_FILES) == {"config.json", "final.json", lottery_report.CSV_FILE,
                                    lottery_report.PLOT_FILE, lottery.REPLICATES_DIR}
  assert set(nm_study.RUN_FILES) == {"config.json", "final.json", nm_study.CSV_FILE,
                                     nm_study.PLOT_FILE, nm_study.RUNS_DIR}
  assert set(oneshot.RUN_FILES) == {"config.json", "final.json", oneshot.CSV_FILE,
                                    oneshot.PLOT_FILE, oneshot.ROWS_DIR, oneshot.PRUNED_DIR}
  assert set(sensitivity.RUN_FILES) == {"config.json", "final.json", sensitivity.CSV_FILE,
                                        sensitivity.PLOT_FILE, sensitivity.RATES_FILE}


def test_overwrite_removes_an_nm_runs_export_and_plot(tiny_config, tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  for name in ("config.json", "nm_export.npz", "curves.png", "notes.txt"):
    with open(os.path.join(workdir, name), "w") as f:
      f.write("{}")
  assert workdir_lib.undeclared(workdir) == ["notes.txt"]
  workdir_lib.start(workdir, tiny_config, overwrite=True)
  assert sorted(os.listdir(workdir)) == ["config.json", "notes.txt"]


def _hold_lock(workdir):
  """A process that holds `workdir`'s lock until killed."""
  code = ("import sys, time; from experiments import workdir as w; w.lock(sys.argv[1]); "
          "print('locked', flush=True); time.sleep(300)")
  holder = subprocess.Popen([sys.executable, "-c", code, workdir], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdout=subprocess.PIPE, text=True)
  assert holder.stdout.readline().strip() == "locked"
  return holder


def _can_lock(workdir):
  code = "import sys; from experiments import workdir as w; w.lock(sys.argv[1]); print('ok')"
  out = subprocess.run([sys.executable, "-c", code, workdir], cwd=ROOT, capture_output=True,
                       env=dict(os.environ, PYTHONPATH=ROOT), text=True, timeout=120)
  return out.stdout.strip() == "ok"


@pytest.mark.parametrize("binary", ["train", "lottery", "nm_study"])
def test_a_library_run_holds_the_workdir_lock_for_the_call_only(binary, tiny_config, tmp_path):
  from experiments import lottery  # pylint: disable=g-import-not-at-top
  from experiments import nm_study  # pylint: disable=g-import-not-at-top
  from experiments.configs import lottery as lottery_config  # pylint: disable=g-import-not-at-top
  from experiments.configs import nm_study as study_config  # pylint: disable=g-import-not-at-top
  if binary == "lottery":
    config, run = lottery_config.get_config(), lottery.run
    config.data_dir = tiny_config.data_dir
  elif binary == "nm_study":
    config, run = study_config.get_config(), nm_study.run
    config.data_dir = tiny_config.data_dir
    config.study.methods, config.study.patterns, config.study.seeds = ("srste",), ((2, 4),), (0,)
  else:
    config, run = tiny_config, train.run
  workdir = str(tmp_path / "run")  # a finished run: on main, a library call just read it back
  os.makedirs(workdir)
  workdir_lib.save_json(workdir, "config.json", workdir_lib.config_dict(config))
  workdir_lib.save_json(workdir, "final.json", {"saved": True})
  holder = _hold_lock(workdir)
  try:
    with pytest.raises(workdir_lib.WorkdirError, match=rf"^Workdir {re.escape(workdir)} is in use "
                                                       rf"by another run \(pid {holder.pid} on"):
      run(config, workdir)
  finally:
    holder.kill()
    holder.wait()
  assert run(config, workdir) == {"saved": True}
  assert _can_lock(workdir)  # released when the call returned


@pytest.mark.parametrize("name", ["config.json", "final.json"])
def test_truncated_json_in_a_workdir_is_a_one_line_error_naming_the_file(tiny_config, tmp_path,
                                                                         name):
  workdir = str(tmp_path / "run")
  os.makedirs(workdir)
  workdir_lib.save_json(workdir, "config.json", workdir_lib.config_dict(tiny_config))
  with open(os.path.join(workdir, name), "w") as f:
    f.write('{"test": {"loss": 0.3')  # cut off mid-write
  before = _snapshot(workdir)
  with pytest.raises(workdir_lib.WorkdirError) as raised:
    train.run(tiny_config, workdir)
  path = os.path.join(workdir, name)
  todo = ("Restore it, or replace the whole run with --overwrite." if name == "config.json" else
          f"`rm {path}` and rerun: it is redone (a run's results from its checkpoints).")
  assert re.fullmatch(rf"{re.escape(path)} is not valid JSON \(truncated or damaged: .* at line 1 "
                      rf"column \d+\)\. {re.escape(todo)}", str(raised.value)), str(raised.value)
  after = _snapshot(workdir)
  after.pop(workdir_lib.LOCK_FILE)  # taken while the run was read, released since
  assert after == before


@pytest.mark.parametrize("key", ["include", "exclude"])
def test_a_leaf_filter_matching_nothing_names_the_key_and_pattern(tiny_config, tmp_path, key):
  tiny_config.pruning[key] = "hiden_0"  # a typo
  with pytest.raises(config_checks.ConfigError) as raised:
    train.run(tiny_config, str(tmp_path / "run"))
  assert str(raised.value) == (
      f"config.pruning.{key}='hiden_0' matches none of the prunable leaves "
      "['head/kernel', 'hidden_0/kernel', 'hidden_1/kernel'].")
  assert not os.path.exists(tmp_path / "run")
