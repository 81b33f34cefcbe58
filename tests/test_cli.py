"""The command line's global options and error reporting: one line for errors hpseg explains,
the traceback for unexpected ones (or for every error with --debug)."""

from __future__ import annotations

import importlib
import logging
import pathlib
import pkgutil
from collections.abc import Callable, Iterator

import pytest
import torch

import hpseg.cli.predict
from hpseg.checkpoints.store import CheckpointError
from hpseg.cli.main import is_user_error, main
from hpseg.errors import HpsegError
from hpseg.files import atomic_write


def _raised(error: Exception) -> Exception:
    """``error`` with a traceback whose innermost frame is this test module (not hpseg)."""
    try:
        raise error
    except Exception as caught:  # noqa: BLE001 - returned for inspection
        return caught


def _failing_predict(monkeypatch: pytest.MonkeyPatch, failure: Callable[[], None]) -> None:
    def predict_paths(*args: object, **kwargs: object) -> None:
        failure()

    monkeypatch.setattr(hpseg.cli.predict, "predict_paths", predict_paths)


@pytest.fixture(autouse=True)
def hpseg_logger() -> Iterator[logging.Logger]:
    """``main`` configures the ``hpseg`` logger; put it back as it was for the other tests."""
    logger = logging.getLogger("hpseg")
    state = logger.level, logger.propagate, list(logger.handlers)
    yield logger
    logger.setLevel(state[0])
    logger.propagate = state[1]
    logger.handlers[:] = state[2]


def _misuse_atomic_write() -> None:
    """A call hpseg's own code rejects with a plain ValueError (its innermost frame is in hpseg)."""
    with atomic_write("x", "ab"):
        pass


PREDICT = ["predict", "x.png", "--checkpoint", "c.pt", "--out", "out"]


def test_which_errors_are_explained_in_one_line() -> None:
    assert is_user_error(_raised(CheckpointError("c.pt is not an hpseg checkpoint")))  # an HpsegError
    assert is_user_error(_raised(FileNotFoundError(2, "No such file", "c.pt")))  # the system's, names the file
    assert not is_user_error(_raised(ValueError("raised outside hpseg")))
    assert not is_user_error(_raised(KeyError("model")))
    try:
        torch.zeros(2) + torch.zeros(3)  # a RuntimeError raised inside torch: a bug to report
    except RuntimeError as error:
        assert not is_user_error(error)
    with pytest.raises(ValueError) as caught:
        hpseg.cli.predict.check_head("kmeans")  # hpseg's check of its input: an HpsegError
    assert isinstance(caught.value, HpsegError) and is_user_error(caught.value)
    with pytest.raises(ValueError) as caught:
        _misuse_atomic_write()  # a ValueError raised inside hpseg, about hpseg's own call: a bug
    assert not isinstance(caught.value, HpsegError) and not is_user_error(caught.value)


def _exception_classes() -> dict[str, type[BaseException]]:
    """Every exception class defined in an hpseg module, by qualified name."""
    found = {}
    for info in pkgutil.walk_packages(hpseg.__path__, "hpseg."):
        if info.name == "hpseg.__main__":
            continue
        for value in vars(importlib.import_module(info.name)).values():
            if isinstance(value, type) and issubclass(value, Exception) and value.__module__ == info.name:
                found[f"{info.name}.{value.__name__}"] = value
    return found


def test_every_hpseg_error_class_derives_from_hpseg_error() -> None:
    """One base class for the errors a user can fix; each keeps the built-in base it always had.
    The ONNX runner's own classes are the exception: that file runs without hpseg (the CLI turns
    them into a UsageError)."""
    classes = _exception_classes()
    assert len(classes) >= 12
    outside = sorted(name for name, cls in classes.items() if not issubclass(cls, HpsegError))
    assert outside == ["hpseg.export.onnx_runner.OnnxModelError", "hpseg.export.onnx_runner.OnnxRuntimeMissingError"]
    assert issubclass(classes["hpseg.checkpoints.store.CheckpointError"], ValueError)
    assert issubclass(classes["hpseg.data.errors.ImageReadError"], OSError)
    assert issubclass(classes["hpseg.backbones.weights.BackboneWeightsError"], RuntimeError)
    assert issubclass(classes["hpseg.inference.crf_numpy.CRFUnavailableError"], ImportError)


def test_a_bad_setting_is_one_line_through_the_real_command(capsys: pytest.CaptureFixture[str]) -> None:
    """No monkeypatching: the config's own check raises an HpsegError, the command prints one line."""
    assert main(["prepare", "--preset", "no-such-preset", "--data-root", "d"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("hpseg prepare: error: unknown preset 'no-such-preset'") and err.count("\n") == 1


def test_a_plain_value_error_inside_hpseg_keeps_its_traceback(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Defect: a ValueError whose innermost frame was in hpseg was printed as one line, so a bug in
    hpseg's own code looked like a user's mistake. Only HpsegError (and OSError) is one line now."""
    _failing_predict(monkeypatch, _misuse_atomic_write)
    assert main(PREDICT) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and 'with atomic_write("x", "ab")' in err
    assert err.rstrip().splitlines()[-1] == "hpseg predict: error: atomic_write mode must be 'wb' or 'w', got 'ab'"


def test_unexpected_errors_keep_their_traceback(monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Defect: the CLI printed any RuntimeError / ValueError as one line, hiding bugs."""

    def bug() -> None:
        torch.zeros(2) + torch.zeros(3)

    _failing_predict(monkeypatch, bug)
    assert main(PREDICT) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "torch.zeros(2) + torch.zeros(3)" in err
    assert err.rstrip().splitlines()[-1].startswith("hpseg predict: error: The size of tensor a")


def test_hpseg_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    def unreadable() -> None:
        raise CheckpointError("c.pt is not a readable PyTorch checkpoint")

    _failing_predict(monkeypatch, unreadable)
    assert main(PREDICT) == 2
    assert capsys.readouterr().err == "hpseg predict: error: c.pt is not a readable PyTorch checkpoint\n"
    assert main(["--debug", *PREDICT]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("hpseg predict: error: c.pt is not a readable PyTorch checkpoint\n")


@pytest.mark.parametrize(("flags", "level"), [
    ([], logging.INFO), (["--quiet"], logging.WARNING), (["-v"], logging.DEBUG),
    (["predict-flag", "--quiet"], logging.WARNING), (["predict-flag", "--no-progress"], logging.WARNING),
])
def test_quiet_and_verbose_set_the_log_level(flags: list[str], level: int, monkeypatch: pytest.MonkeyPatch,
                                             hpseg_logger: logging.Logger) -> None:
    """Before the command or after it (``predict-flag`` marks the latter here)."""
    monkeypatch.setattr(hpseg.cli.predict, "predict_paths", lambda *a, **k: {"succeeded": 1, "skipped": []})
    before, after = (flags, []) if "predict-flag" not in flags else ([], flags[1:])
    assert main([*before, *PREDICT, *after]) == 0
    assert hpseg_logger.level == level


@pytest.mark.parametrize("command", [["train", "--preset", "cocostuff27"], ["train", "--resume", "run"]])
def test_train_no_progress_turns_the_progress_bars_off(command: list[str], tmp_path: pathlib.Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       hpseg_logger: logging.Logger) -> None:
    """`hpseg train --no-progress` (also what `--seeds` passes to each seed's run) sets the level at
    which the training bars stay off; it was once accepted and ignored."""
    import hpseg.training.trainer

    monkeypatch.setattr(hpseg.training.trainer, "train", lambda *args, **kwargs: tmp_path)
    monkeypatch.setattr(hpseg.training.trainer, "resume", lambda *args, **kwargs: tmp_path)
    assert main([*command, "--no-progress"]) == 0
    assert hpseg_logger.level == logging.WARNING
    assert not hpseg_logger.isEnabledFor(logging.INFO)  # what hpseg.logs.progress_bar asks
