"""Data layer: sources, decoding, splits, augmentation and loaders."""

from vision_si.data.table import SampleTable

__all__ = ["SampleTable"]
