"""CPU threads that fit the machine: the cores a process may use (affinity, cgroup quota, its
share under torchrun) and torch's threads chosen from them and the workers a command starts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hpseg import runtime
from hpseg.data.synthetic import make_synthetic_dataset
from hpseg.runtime import available_cores, cgroup_cpu_limit, choose_threads, default_crf_workers

ROOT = Path(__file__).resolve().parents[1]


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    return tmp_path


@pytest.mark.parametrize(("files", "cores"), [
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu.max": "250000 100000\n"}, 2.5),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "50000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 0.5),
    ({"cpu.max": "garbage\n"}, None),
    ({}, None),
], ids=["v2-unlimited", "v2-2.5", "v1-unlimited", "v1-half", "unreadable", "absent"])
def test_cgroup_quota_in_cores(tmp_path, files, cores):
    assert cgroup_cpu_limit(_cgroup(tmp_path, files)) == cores


def test_available_cores_from_affinity_quota_and_local_ranks(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    unlimited = _cgroup(tmp_path / "a", {"cpu.max": "max 100000"})
    assert available_cores(unlimited) == 16
    assert available_cores(_cgroup(tmp_path / "b", {"cpu.max": "600000 100000"})) == 6  # the quota caps
    assert available_cores(_cgroup(tmp_path / "c", {"cpu.max": "50000 100000"})) == 1  # never 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # torchrun, 4 ranks on this machine: a quarter each
    assert available_cores(unlimited) == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    assert available_cores(unlimited) == 1


def test_threads_by_flag_environment_or_free_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert choose_threads(2, cores=8)[0] == 6  # the loader's 2 workers keep their cores
    assert choose_threads(2, cores=2)[0] == 1  # never more threads than free cores, never fewer than 1
    assert choose_threads(0, 3, cores=2) == (3, "--threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert choose_threads(2, cores=8) == (5, "OMP_NUM_THREADS")
    assert choose_threads(2, 3, cores=8)[0] == 3  # the flag wins
    with pytest.raises(ValueError, match="at least 1"):
        choose_threads(0, 0)
    assert default_crf_workers(2, cores=16) == 14 and default_crf_workers(4, cores=2) == 1


def test_fit_threads_sets_torch_and_says_so_once(monkeypatch, notices):
    import torch

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "available_cores", lambda: 3)
    before = torch.get_num_threads()
    try:
        assert runtime.fit_threads(1) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert notices.messages.count("torch uses 2 CPU thread(s) (3 core(s) available, 1 worker process(es) started)") == 1


@pytest.mark.parametrize(("flag", "env", "expected"), [
    ([], {}, "torch uses {cores} CPU thread(s) ({cores} core(s) available, 0 worker process(es) started)"),
    ([], {"OMP_NUM_THREADS": "1"}, "torch uses 1 CPU thread(s) (OMP_NUM_THREADS)"),
    (["--threads", "3"], {}, "torch uses 3 CPU thread(s) (OMP_NUM_THREADS)"),
], ids=["default", "omp", "flag"])
def test_the_command_logs_its_choice(tmp_path, flag, env, expected):
    data = make_synthetic_dataset(tmp_path / "data", n_train=2, n_val=0, size=32, n_classes=3, seed=0)
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE")}
    run = subprocess.run(
        [sys.executable, "-m", "hpseg", "clusters", "vit_tiny_p8", "--random-backbone", "--data-root", str(data),
         "--k", "2,3", "--size", "32", "--out", str(tmp_path / "out"), *flag],
        capture_output=True, text=True, env={**base, **env,
                                             "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
        # two cores for the child whatever this machine has, so the default is known
        preexec_fn=lambda: os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:2]), timeout=300)
    assert run.returncode == 0, run.stderr
    cores = min(2, available_cores())  # the child's: at most two, fewer under a cgroup quota
    assert run.stderr.count("torch uses") == 1 and expected.format(cores=cores) in run.stderr


@pytest.mark.parametrize(("command", "flag", "value"), [
    (["eval", "run"], "--crf-workers", "-1"), (["predict", "x", "--out", "y"], "--crf-workers", "-1"),
    (["train"], "--threads", "0"), (["clusters", "vit_tiny_p8", "--data-root", "d"], "--threads", "-3"),
])
def test_worker_and_thread_counts_are_checked_by_the_parser(capsys, command, flag, value):
    from hpseg.cli.main import main

    with pytest.raises(SystemExit) as stopped:
        main([*command, flag, value])
    assert stopped.value.code == 2 and f"argument {flag}: {value}: must be" in capsys.readouterr().err
