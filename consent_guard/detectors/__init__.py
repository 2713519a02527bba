"""Detector backends behind small protocols (see base.py)."""
from .base import ImageScorer, PartDetection, PartDetector

__all__ = ["ImageScorer", "PartDetection", "PartDetector"]
