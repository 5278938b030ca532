"""Stage 1, calibrate: the calibration text (built-in or the user's files) as token windows."""
