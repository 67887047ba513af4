"""Nipype interfaces for the preprocessing steps, one module per tool.

``n4`` (SimpleITK N4 bias correction), ``brainmask`` (deepbet brain extraction), ``registration``
(antspyx registration and resampling), ``normalize`` (percentile intensity scaling) and ``canny``
(3D Canny edges at a fixed edge-voxel ratio).
"""

#: Extension of the images our nodes write into the work directory: uncompressed, because
#: gzip at level 6 cost the 1 mm preprocessing of one head about 15 s of 72 (ten 7-million
#: voxel files written and read back); the sinks compress every derivative they write.
WORK_IMAGE_EXTENSION = ".nii"
