"""Nipype interfaces for the preprocessing steps, one module per tool.

``n4`` (SimpleITK N4 bias correction), ``brainmask`` (deepbet brain extraction), ``registration``
(antspyx registration and resampling), ``normalize`` (percentile intensity scaling) and ``canny``
(3D Canny edges at a fixed edge-voxel ratio).
"""
