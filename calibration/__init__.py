"""regseg.calibration: what an IGT engineer does before the first frame (issue 10).

- :mod:`.pivot`: stylus tip by pivot calibration (StylusTipToStylus).
- :mod:`.points`: paired-point rigid/similarity registration, FRE, Fitzpatrick's predicted TRE.
- :mod:`.nwire`: probe spatial calibration with an N-wire phantom (ImageToProbe, pixels -> mm).
- :mod:`.temporal`: the lag between the tracker's and the images' clocks.
- :mod:`.transforms_io`, :mod:`.markups`: transform and landmark files Slicer, ITK and PLUS read.
- :mod:`.inputs`: tracked data from PLUS sequence files or CSV.
- :mod:`.live`: what ``regseg-stream`` reads (probe calibration, ReferenceToMRI, landmarks).
- :mod:`.cli`, :mod:`.plots`, :mod:`.simulate`: ``regseg calibrate ...``.
"""
