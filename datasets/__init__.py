"""Getting volumes in: NIfTI, DICOM series, synthetic multi-site phantoms (imports nothing else of voxgrid)."""
