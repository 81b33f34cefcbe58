"""The ``hpseg export`` and ``hpseg push`` subcommands (arguments and what they run).

The parser imports this module for the arguments, so what the commands run (torch, onnx,
huggingface_hub) is imported inside the ``run_`` functions, as in :mod:`hpseg.cli.main`.
"""

from __future__ import annotations

import argparse

from hpseg.cli.errors import UsageError


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="hpseg checkpoint, run folder, authors' checkpoint, hub folder or hf://owner/name")
    p.add_argument("--format", choices=("onnx", "hub"), required=True,
                   help="onnx: one graph for onnxruntime (pip install 'hpseg[onnx]'); hub: a Hugging Face Hub folder")
    p.add_argument("--out", required=True, help="model.onnx to write (onnx) or folder to write (hub)")
    p.add_argument("--mapping", metavar="RESULTS_JSON",
                   help="cluster->class mapping to include (default: the evaluation of this checkpoint in its run "
                        "folder, when there is one)")
    p.add_argument("--no-mapping", action="store_true", help="include no cluster->class mapping")
    p.add_argument("--size", type=int, default=None, help="default shorter side recorded for the model "
                                                          "(default: the checkpoint's data.val_size)")
    p.add_argument("--window", type=int, default=None, help="default sliding window recorded (default: --size)")
    p.add_argument("--weights", help="local backbone weights file (overrides the checkpoint's)")


def run_export(args: argparse.Namespace) -> int:
    mapping = None if args.no_mapping else (args.mapping or "auto")
    if args.format == "hub":
        from hpseg.export.hub import export_hub  # torch: only when the command runs

        if args.size is not None or args.window is not None or args.weights:
            raise UsageError("--size, --window and --weights apply to --format onnx only (a hub folder keeps "
                             "the checkpoint's settings and weights)")
        written = export_hub(args.checkpoint, args.out, mapping=mapping)
        print(f"hub folder written to {args.out} ({', '.join(p.name for p in written)}); "
              f"upload it with: hpseg push {args.out} OWNER/NAME")
        return 0
    from hpseg.export.onnx import OPSET, check_destination, export_onnx
    from hpseg.inference.segmenter import load  # torch: only when the command runs

    check_destination(args.out)  # before loading and exporting (18-60 s): a refused --out costs nothing
    segmenter = load(args.checkpoint, device="cpu", weights=args.weights, mapping=mapping, size=args.size,
                     window=args.window)
    out = export_onnx(segmenter, args.out, checkpoint=args.checkpoint)
    print(f"ONNX model (opset {OPSET}) written to {out}: input 'image' uint8 (B, 3, H, W) RGB 0..255, H and W "
          f"multiples of {segmenter.tiling.patch}; mapping {segmenter.mapping_source or 'none'}. "
          f"Segment with: hpseg predict PHOTOS --onnx {out} --out preds/")
    return 0


def add_push_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", help="a folder written by `hpseg export --format hub`")
    p.add_argument("repo", metavar="OWNER/NAME", help="Hub model repository (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repository as private")
    p.add_argument("--message", help="commit message")
    p.add_argument("--token", help="Hub token (default: HF_TOKEN, or the one saved by `hf auth login`)")


def run_push(args: argparse.Namespace) -> int:
    from hpseg.export.hub import push  # huggingface_hub: only when the command runs

    commit = push(args.folder, args.repo, private=args.private, message=args.message, token=args.token)
    print(f"pushed {args.folder} to https://huggingface.co/{args.repo} ({getattr(commit, 'commit_url', commit)}); "
          f"load it with hpseg.load('hf://{args.repo}')")
    return 0
