"""Synthetic GenEval-shaped "shapes world": prompts, renderer, exact image codebook and exact detector.

See :mod:`worlds.shapes.world` (config + prompts), :mod:`worlds.shapes.render`, :mod:`worlds.shapes.codebook`
and :mod:`worlds.shapes.detector`.
"""
from worlds.shapes.detector import ShapesDetector, make_detector
from worlds.shapes.render import ShapesRenderer, render_batch, sample_codes
from worlds.shapes.codebook import ShapesCodebook, make_decoder
from worlds.shapes.world import (COLOR_RGB, RELATIONS, ShapesWorld, all_prompts, make_splits, read_jsonl,
                                  write_jsonl, write_splits)

__all__ = ["COLOR_RGB", "RELATIONS", "ShapesWorld", "all_prompts", "make_splits", "read_jsonl", "write_jsonl",
           "write_splits", "ShapesRenderer", "render_batch", "sample_codes", "ShapesCodebook", "make_decoder",
           "ShapesDetector", "make_detector"]
