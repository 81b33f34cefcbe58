"""How deep one training step's loss sits below ``hpseg train``: frames and files on the call stack.

Runs a one-step ``hpseg train`` of a random tiny ViT on a synthetic set (32 px crops, CPU) in
this process and records the Python stack at the first call of the torch path's pair work
(``torch_loss_and_gradients`` in ``hpseg/method/loss/torch_path.py``, where the loss's own work
starts on the CPU). Prints the frames from ``hpseg.cli.main.main`` down to it and, both to the
loss's entry (the first frame in ``hpseg/method/loss/``) and to its pair work, how many hpseg
frames there are and in how many distinct hpseg files they lie (torch's frames, such as
``nn.Module.__call__``, are counted apart).

    python benchmarks/step_path.py
"""

from __future__ import annotations

import sys
import tempfile
import traceback
from pathlib import Path

TARGET = ("torch_path.py", "torch_loss_and_gradients")


def tiny_data(root: Path) -> Path:
    from hpseg.data import build_raw_dataset, make_synthetic_dataset, prepare_five_crops

    make_synthetic_dataset(root, n_train=4, n_val=2, size=64, n_classes=4, seed=0)
    prepare_five_crops(build_raw_dataset("folder", root, "train"), root / "hpseg_prepared" / "train_32", crop_size=32)
    return root


def stack_at(target: tuple[str, str], command: list[str]) -> list[traceback.FrameSummary]:
    """The Python stack from ``hpseg.cli.main.main`` down to the first call of ``target`` (a file
    name ending and a function name) while ``hpseg COMMAND`` runs in this process."""
    from hpseg.cli.main import main as hpseg_main

    captured: list[traceback.StackSummary] = []

    def profile(frame, event, arg):  # noqa: ANN001 - sys.setprofile's signature
        if event == "call" and not captured and frame.f_code.co_name == target[1] \
                and frame.f_code.co_filename.endswith(target[0]):
            captured.append(traceback.extract_stack(frame))

    sys.setprofile(profile)
    try:
        hpseg_main(command)
    finally:
        sys.setprofile(None)
    if not captured:
        raise SystemExit(f"{target[1]} in {target[0]} was never called")
    frames = list(captured[0])
    start = next(i for i, f in enumerate(frames) if f.filename.endswith("cli/main.py") and f.name == "main")
    return frames[start:]


def print_stack(frames: list[traceback.FrameSummary]) -> None:
    for f in frames:
        where = f.filename.split("/hpseg/", 1)[1] if "/hpseg/" in f.filename else f"(torch) {Path(f.filename).name}"
        print(f"  {where}:{f.lineno} {f.name}")


def count(label: str, frames: list[traceback.FrameSummary]) -> None:
    """Prints how many hpseg frames ``frames`` holds (the others apart), in how many hpseg files."""
    ours = [f for f in frames if "/hpseg/" in f.filename]
    files = sorted({f.filename.split("/hpseg/", 1)[1] for f in ours})
    print(f"{label}: {len(ours)} hpseg frames ({len(frames) - len(ours)} others) in {len(files)} files: "
          f"{', '.join(files)}")


#: A one-step ``hpseg train`` of a random tiny ViT on ``tiny_data`` (append the run folder's and data's options).
TINY_TRAIN = ["--quiet", "train", "backbone.name=vit_tiny_p8", "backbone.pretrained=false", "data.dataset=folder",
              "data.crop_size=32", "data.val_size=32", "data.num_workers=0", "method.dim=16", "method.n_classes=4",
              "method.pool_size=8", "train.batch_size=4", "train.max_steps=1", "train.device=cpu",
              "train.label_free_crops=0"]


def main() -> None:
    with tempfile.TemporaryDirectory() as work:
        data = tiny_data(Path(work) / "data")
        frames = stack_at(TARGET, [*TINY_TRAIN, "--run-dir", str(Path(work) / "run"), f"data.root={data}"])
    print_stack(frames)
    entry = next(i for i, f in enumerate(frames) if "/hpseg/method/loss/" in f.filename)
    count("to the loss's entry", frames[: entry + 1])
    count("to its pair work", frames)


if __name__ == "__main__":
    main()
