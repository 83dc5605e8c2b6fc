"""Mask tracking with SAM 2 (the `segment` stage): `stage` (the stage and its options), `engine` (online SAM 2 over
many streams), `memory` (the bounded per-stream memory bank), `visibility` (visible / occluded / lost from object
scores), `boxes` (prompts and boxes in frame pixels), `model` (SAM 2.1 models by name, their weights, the model
manager's loader).

Light on import: torch and sam2 are imported when the model loads.
"""

from __future__ import annotations

from streamd.stages.segment.stage import ObjectLimit, ObjectNotFound, Segment, SegmentError, SegmentOptions

__all__ = ["ObjectLimit", "ObjectNotFound", "Segment", "SegmentError", "SegmentOptions"]
