"""A calibrated step-time model: the per-operator roofline with one layer's GEMM and elementwise time
corrected by a measured table (a catalog LayerProfile, e.g. from Vidur's operator profiles).

What the table carries over is the ratio measured / roofline at each profiled token count; between two
profiled counts that ratio is interpolated linearly in tokens and applied to the roofline there, and
outside the table the nearest end's ratio is held. The ratio, not the time, is interpolated because the
roofline already places the steps a GEMM takes where a new row of output tiles starts a wave; what it
misses (the library's kernel choice and efficiency for that shape) drifts slowly with tokens. Held out
of the table (2-fold, every other profiled count), this predicts Vidur's H100 Llama-2 layers better than
interpolating the measured times themselves (benchmarks/fidelity.py --cross-validate).
Attention, all-reduce, LM head and fixed overheads stay the roofline's (the profiles do not cover them).
"""
from __future__ import annotations

import numpy as np

from emulator.physics.catalog import LayerProfile
from emulator.physics.deployment import Deployment
from emulator.physics.operators import ZERO, Cost, OperatorModel


class ProfiledModel(OperatorModel):
    def __init__(self, dep: Deployment, profile: LayerProfile):
        super().__init__(dep)
        self.tokens = np.array(profile.tokens, dtype=float)
        roof = [super(ProfiledModel, self)._linear_layer(t).seconds for t in profile.tokens]
        self.ratios = np.array([ms * 1e-3 / r for ms, r in zip(profile.layer_ms, roof, strict=True)])

    def _linear_layer(self, tokens: int) -> Cost:
        roof = super()._linear_layer(tokens)
        if tokens <= 0 or roof.seconds <= 0:
            return ZERO
        return roof.scaled(self.ratio(tokens))  # keep the roofline's compute/memory split

    def ratio(self, tokens: float) -> float:
        """Measured over roofline time at `tokens`: interpolated between profiled counts, held past the ends."""
        return float(np.interp(tokens, self.tokens, self.ratios))
