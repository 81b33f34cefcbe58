"""The ``hpseg`` command line: argument parsing (:mod:`.main`), the ``predict`` command's file
discovery and writing (:mod:`.predict`) and the self-contained demo (:mod:`.demo`).
"""

from .main import main

__all__ = ["main"]
