"""Calibration: fitting the step model's catalog coefficients to operator profiles, step tables or a
live engine's probes (``kvlab calibrate``), and comparing the model with reference data."""
