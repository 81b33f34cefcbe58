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

import sys
import tempfile
import traceback
from pathlib import Path

from benchmarks.step_path import tiny_data

TARGET = ("method/heads.py", "forward")


def main() -> None:
    from hpseg.cli.main import main as hpseg_main

    captured: list[traceback.StackSummary] = []

    def profile(frame, event, arg):  # noqa: ANN001 - sys.setprofile's signature
        if event == "call" and not captured and frame.f_code.co_name == TARGET[1] \
                and frame.f_code.co_filename.endswith(TARGET[0]):
            captured.append(traceback.extract_stack(frame))

    with tempfile.TemporaryDirectory() as work:
        data = tiny_data(Path(work) / "data")
        run = Path(work) / "run"
        hpseg_main(["--quiet", "train", "--run-dir", str(run), "backbone.name=vit_tiny_p8",
                    "backbone.pretrained=false", "data.dataset=folder", f"data.root={data}", "data.crop_size=32",
                    "data.val_size=32", "data.num_workers=0", "method.dim=16", "method.n_classes=4",
                    "method.pool_size=8", "train.batch_size=4", "train.max_steps=1", "train.device=cpu",
                    "train.label_free_crops=0", "train.selection=last"])
        image = next(p for p in sorted(data.rglob("*")) if p.suffix in (".png", ".jpg") and "val" in str(p))
        sys.setprofile(profile)
        try:
            hpseg_main(["--quiet", "predict", str(image), "--checkpoint", str(run / "checkpoints" / "last.pt"),
                        "--out", str(Path(work) / "predictions"), "--device", "cpu"])
        finally:
            sys.setprofile(None)
    if not captured:
        raise SystemExit("the segmentation head was never called")
    frames = list(captured[0])
    start = next(i for i, f in enumerate(frames) if f.filename.endswith("cli/main.py") and f.name == "main")
    frames = frames[start:]
    for f in frames:
        where = f.filename.split("/hpseg/", 1)[1] if "/hpseg/" in f.filename else f"(other) {Path(f.filename).name}"
        print(f"  {where}:{f.lineno} {f.name}")
    ours = [f for f in frames if "/hpseg/" in f.filename]
    files = sorted({f.filename.split("/hpseg/", 1)[1] for f in ours})
    print(f"to the segmentation head: {len(ours)} hpseg frames ({len(frames) - len(ours)} others) in "
          f"{len(files)} files: {', '.join(files)}")


if __name__ == "__main__":
    main()
