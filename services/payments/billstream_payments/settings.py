"""Settings of payments: env `BILLSTREAM_PAYMENTS_X`, falling back to `BILLSTREAM_X`."""

from __future__ import annotations

from typing import Literal

from billstream_runtime.settings import ServiceSettings, load_settings


class PaymentsSettings(ServiceSettings):
    service_name: str = "payments"
    #: The gateway adapter bootstrap.py wires in; only the sandbox exists so far.
    gateway: Literal["sandbox"] = "sandbox"
    #: The collector wakes on NOTIFY; this is its fallback poll interval.
    collect_poll_interval_s: float = 1.0
    #: Pending payments leased per round.
    collect_batch_size: int = 20
    #: How long a collector holds a pending payment before another may take it over.
    collect_lease_s: float = 60.0
    #: After a gateway error, when the payment is tried again.
    collect_retry_s: float = 5.0


def settings_from_env() -> PaymentsSettings:
    return load_settings("payments", PaymentsSettings)
