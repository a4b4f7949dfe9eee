"""A calibrated step-time model: the per-operator roofline with one layer's GEMM and elementwise time
read from a measured table (a catalog LayerProfile, e.g. fitted from Vidur's operator profiles).

Between measured token counts the time is interpolated linearly; past the last one it follows the
roofline's growth from there. Attention, all-reduce, LM head and fixed overheads stay the roofline's
(the profiles do not cover them).
"""
from __future__ import annotations

import bisect

from emulator.physics.catalog import LayerProfile
from emulator.physics.deployment import Deployment
from emulator.physics.operators import ZERO, Cost, OperatorModel


class ProfiledModel(OperatorModel):
    def __init__(self, dep: Deployment, profile: LayerProfile):
        super().__init__(dep)
        self.tokens = list(profile.tokens)
        self.seconds = [ms * 1e-3 for ms in profile.layer_ms]

    def _linear_layer(self, tokens: int) -> Cost:
        roof = super()._linear_layer(tokens)
        if tokens <= 0 or roof.seconds <= 0:
            return ZERO
        return roof.scaled(self._measured(tokens) / roof.seconds)  # keep the roofline's compute/memory split

    def _measured(self, tokens: int) -> float:
        ts, ss = self.tokens, self.seconds
        if tokens <= ts[0]:
            return ss[0]
        if tokens >= ts[-1]:
            return ss[-1] * super()._linear_layer(tokens).seconds / super()._linear_layer(ts[-1]).seconds
        i = bisect.bisect_right(ts, tokens)
        w = (tokens - ts[i - 1]) / (ts[i] - ts[i - 1])
        return ss[i - 1] + w * (ss[i] - ss[i - 1])
