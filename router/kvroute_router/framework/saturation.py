"""When an endpoint counts as saturated: the one definition admission control and the
``load-headroom`` filter share.

An endpoint is saturated when its waiting queue reaches the policy's
``spec.admission.saturationQueueDepth`` or its KV-cache utilisation reaches
``spec.admission.saturationKvUtilization`` (default :data:`KV_SATURATION`). Admission control
queues or sheds when *every* endpoint of a policy is saturated. ``load-headroom`` applies the
same thresholds with the queue measured *above the median candidate's* (it removes hot
spots, not busy engines; see its module). Both read the thresholds
from :class:`Saturation`, so a policy's numbers mean one thing wherever they are used.

*Decision:* this lives in ``framework/`` (the lowest layer) rather than ``admission/`` because
the plugin that uses it sits below admission in the router's layers (plugins must not import
the admission package).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from kvroute_api.route_policy import AdmissionSpec

KV_SATURATION = AdmissionSpec.model_fields["saturation_kv_utilization"].default
"""KV-cache utilisation (0..1) at which an endpoint is saturated, for a policy without
``spec.admission``."""

DEFAULT_QUEUE_DEPTH = AdmissionSpec.model_fields["saturation_queue_depth"].default
"""``AdmissionSpec.saturationQueueDepth``'s default, for a policy without ``spec.admission``."""


@dataclass(frozen=True)
class Saturation:
    """The saturation thresholds of one policy."""

    queue_depth: float = DEFAULT_QUEUE_DEPTH
    kv_utilization: float = KV_SATURATION

    @classmethod
    def of(cls, admission: AdmissionSpec | None) -> Saturation:
        """The thresholds of a policy's ``spec.admission`` (defaults when it has none)."""
        if admission is None:
            return cls()
        return cls(queue_depth=admission.saturation_queue_depth,
                   kv_utilization=admission.saturation_kv_utilization)

    def saturated(self, waiting: float, kv_utilization: float) -> bool:
        """Whether one endpoint with this load is saturated."""
        return waiting >= self.queue_depth or kv_utilization >= self.kv_utilization

    def headroom(self, waiting: npt.NDArray[np.float64],
                 kv_utilization: npt.NDArray[np.float64]) -> npt.NDArray[np.bool_]:
        """Element-wise ``not saturated`` over many endpoints (the filter's vector form)."""
        return np.asarray((waiting < self.queue_depth) & (kv_utilization < self.kv_utilization),
                          dtype=np.bool_)
