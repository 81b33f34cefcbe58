"""How deep one ``hpseg predict`` call's model work sits below the command: frames and files.

Trains a one-step random tiny ViT run on a synthetic set (as ``benchmarks/step_path.py`` does),
then runs ``hpseg predict`` on one of its images in this process and records the Python stack
at the first call of the segmentation head (``SegmentationHead.forward`` in
``hpseg/method/heads.py``, the first step of a prediction that is HP's own). Prints the frames
from ``hpseg.cli.main.main`` down to it, and how many hpseg frames there are in how many
distinct hpseg files (torch's frames, such as ``nn.Module.__call__``, are counted apart).

    python benchmarks/predict_path.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from benchmarks.step_path import TINY_TRAIN, count, print_stack, stack_at, tiny_data

TARGET = ("method/heads.py", "forward")


def main() -> None:
    from hpseg.cli.main import main as hpseg_main

    with tempfile.TemporaryDirectory() as work:
        data = tiny_data(Path(work) / "data")
        run = Path(work) / "run"
        hpseg_main([*TINY_TRAIN, "--run-dir", str(run), f"data.root={data}", "train.selection=last"])
        image = next(p for p in sorted(data.rglob("*")) if p.suffix in (".png", ".jpg") and "val" in str(p))
        frames = stack_at(TARGET, ["--quiet", "predict", str(image), "--checkpoint", str(run / "checkpoints" / "last.pt"),
                                   "--out", str(Path(work) / "predictions"), "--device", "cpu"])
    print_stack(frames)
    count("to the segmentation head", frames)


if __name__ == "__main__":
    main()
