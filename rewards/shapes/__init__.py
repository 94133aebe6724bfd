"""Synthetic GenEval-shaped "shapes world": prompts, renderer, exact image codebook and exact detector.

See :mod:`rewards.shapes.world` (config + prompts), :mod:`rewards.shapes.render`, :mod:`rewards.shapes.codebook`
and :mod:`rewards.shapes.detector`.
"""
from rewards.shapes.detector import ShapesDetector, make_detector
from rewards.shapes.render import ShapesRenderer, render_batch, sample_codes
from rewards.shapes.codebook import ShapesCodebook, make_decoder
from rewards.shapes.world import (COLOR_RGB, RELATIONS, ShapesWorld, all_prompts, make_splits, read_jsonl,
                                  write_jsonl, write_splits)

__all__ = ["COLOR_RGB", "RELATIONS", "ShapesWorld", "all_prompts", "make_splits", "read_jsonl", "write_jsonl",
           "write_splits", "ShapesRenderer", "render_batch", "sample_codes", "ShapesCodebook", "make_decoder",
           "ShapesDetector", "make_detector"]
