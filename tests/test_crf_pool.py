"""The dense CRF in worker processes: the serial path's results image for image, in order,
and a pool that ends cleanly when a worker dies or the user presses Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hpseg.backbones import create_backbone
from hpseg.evaluation.protocol import evaluate_model
from hpseg.inference.crf_numpy import refine_labels
from hpseg.inference.crf_pool import CRFPool, CRFWorkerError
from hpseg.inference.segmenter import Segmenter
from hpseg.inference.tiling import Tiling
from hpseg.method.model import HiddenPositivesModel

pytest.importorskip("pydensecrf.densecrf")

ROOT = Path(__file__).resolve().parents[1]


# Tasks the workers run: module level, so that the worker processes find them by name.
def die_on(value: int, fatal: int) -> int:
    if value == fatal:
        os.kill(os.getpid(), signal.SIGKILL)  # as the kernel's out-of-memory killer would
    return value


def slow_square(value: int) -> int:
    time.sleep(0.2)
    return value * value


def _crf_jobs(n: int, size: int = 24, n_labels: int = 4) -> list[tuple[int, tuple[np.ndarray, list[np.ndarray]]]]:
    """n random images with two heads' probabilities each (rough, so the CRF changes labels)."""
    rng = np.random.default_rng(0)
    jobs = []
    for i in range(n):
        image = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        heads = []
        for k in (n_labels, n_labels + 1):
            logits = rng.normal(size=(k, size, size)).astype(np.float32)
            heads.append((np.exp(logits) / np.exp(logits).sum(0)).astype(np.float32))
        jobs.append((i, (image, heads)))
    return jobs


def _pids(pool: CRFPool) -> list[int]:
    assert pool._executor is not None
    return list(pool._executor._processes)  # the running workers (their start is lazy: after a submit)


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_pool_gives_the_serial_labels_image_for_image_in_order():
    jobs = _crf_jobs(6)
    serial = [refine_labels(*args) for _, args in jobs]
    with CRFPool(2) as pool:
        parallel = list(pool.map(jobs, total=len(jobs)))
    assert [meta for meta, _ in parallel] == list(range(6))
    for expected, (_, got) in zip(serial, parallel):
        assert len(got) == 2 and all(np.array_equal(e, g) for e, g in zip(expected, got))
    # the CRF did something: the refined labels are not the unrefined argmax everywhere
    assert any(not np.array_equal(serial[i][0], jobs[i][1][1][0].argmax(0)) for i in range(6))


def test_in_process_pool_is_the_serial_path():
    jobs = _crf_jobs(2)
    with CRFPool(0) as pool:
        assert pool._executor is None
        got = list(pool.map(jobs))
    assert all(np.array_equal(a, b) for (_, args), (_, out) in zip(jobs, got) for a, b in zip(refine_labels(*args), out))


def test_images_in_flight_are_bounded():
    built = []

    def jobs():
        for i in range(12):
            built.append(i)
            yield i, (i,)

    with CRFPool(2, in_flight=3, task=slow_square) as pool:
        for meta, value in pool.map(jobs()):
            assert value == meta * meta
            # at most in_flight jobs were handed out and not yet taken back
            assert len(built) - (meta + 1) <= 3


def test_a_dying_worker_ends_the_pool_with_a_clear_error():
    pool = CRFPool(2, task=die_on)
    started = time.monotonic()
    with pytest.raises(CRFWorkerError, match="worker process died.*--crf-workers"):
        with pool:
            for _ in pool.map((i, (i, 3)) for i in range(8)):
                pass
    assert time.monotonic() - started < 60 and pool._executor is None


def test_ctrl_c_in_the_main_process_stops_the_workers():
    pool = CRFPool(2, task=slow_square)
    pids: list[int] = []

    def jobs():
        for i in range(100):
            if i == 4:
                pids.extend(_pids(pool))
                raise KeyboardInterrupt  # what Ctrl-C raises while the backbone computes the next batch
            yield i, (i,)

    with pytest.raises(KeyboardInterrupt):
        with pool:
            for _ in pool.map(jobs()):
                pass
    assert pool._executor is None and pids and all(_gone(pid) for pid in pids)


def test_sigint_to_the_whole_process_group_ends_the_command(tmp_path):
    """A terminal's Ctrl-C reaches every process of the group: the workers leave it to the main
    process, which stops them, says so, and exits without waiting for the remaining images."""
    script = tmp_path / "interrupted.py"
    script.write_text(textwrap.dedent("""
        import logging, sys
        from hpseg.logs import configure_logging
        from hpseg.inference.crf_pool import CRFPool
        from tests.test_crf_pool import slow_square
        if __name__ == "__main__":  # worker processes import the main script, as with any multiprocessing
            configure_logging(0)
            with CRFPool(2, task=slow_square) as pool:
                for meta, value in pool.map((i, (i,)) for i in range(1000)):
                    if meta == 3:
                        print("running", flush=True)
        """))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, start_new_session=True)
    try:
        assert process.stdout is not None and process.stdout.readline().strip() == "running"
        os.killpg(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0
    assert "interrupted: stopping the 2 CRF worker processes" in stderr and "KeyboardInterrupt" in stderr
    assert "BrokenProcessPool" not in stderr and "CRFWorkerError" not in stderr


def _tiny_segmenter(crf_workers: int) -> Segmenter:
    torch.manual_seed(0)
    backbone = create_backbone("vit_tiny_p8", pretrained=False).eval()
    model = HiddenPositivesModel(feature_dim=backbone.embed_dim, dim=8, n_classes=3).eval()
    return Segmenter(model, backbone, class_names=["a", "b", "c"], tiling=Tiling.create(32, None, 8),
                     device=torch.device("cpu"), crf_workers=crf_workers)


@pytest.mark.parametrize("head", ["cluster", "linear"])
def test_segment_many_with_crf_workers_is_segment_image_for_image(head):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 32), (32, 48), (33, 33))]
    serial = [_tiny_segmenter(0).segment(image, head, crf=True) for image in images]
    for workers in (0, 2):
        maps = list(_tiny_segmenter(workers).segment_many(images, head, crf=True))
        assert all(np.array_equal(a, b) for a, b in zip(serial, maps)), workers
    assert [m.shape for m in serial] == [image.shape[:2] for image in images]


def test_crf_evaluation_with_workers_equals_the_serial_one():
    segmenter = _tiny_segmenter(0)
    torch.manual_seed(2)
    batches = [{"image": torch.randn(2, 3, 32, 32), "rgb": torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8),
                "label": torch.randint(-1, 3, (2, 32, 32))} for _ in range(3)]
    cpu = torch.device("cpu")
    serial = evaluate_model(segmenter.model, segmenter.backbone, batches, 3, cpu, crf=True, crf_workers=0)
    pooled = evaluate_model(segmenter.model, segmenter.backbone, batches, 3, cpu, crf=True, crf_workers=2)
    assert serial == pooled
    plain = evaluate_model(segmenter.model, segmenter.backbone, batches, 3, cpu)
    assert plain.unsupervised.confusion != serial.unsupervised.confusion  # the CRF was applied


def test_crf_workers_need_no_torch():
    """The process the workers fork from imports the task's module: without torch it starts at once."""
    code = ("import sys, hpseg.inference.crf_pool, hpseg.inference.crf_numpy; "
            "sys.exit('torch' in sys.modules)")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    assert subprocess.run([sys.executable, "-c", code], env=env, timeout=120).returncode == 0
