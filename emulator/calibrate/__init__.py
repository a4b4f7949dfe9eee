"""Calibration: fitting the step model's catalog coefficients to measurements (operator profiles, step
tables, live probes) and comparing the model with reference data. Fitting and comparison are pure; the
readers, the probes and the command do the I/O."""
