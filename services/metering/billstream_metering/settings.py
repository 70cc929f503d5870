"""Settings of the metering service (env `BILLSTREAM_METERING_X`, falling back to
`BILLSTREAM_X`)."""

from __future__ import annotations

from billstream_runtime.settings import ServiceSettings, load_settings


class MeteringSettings(ServiceSettings):
    service_name: str = "metering"
    # How often the period-close task looks for closes whose preceding usage is all applied.
    close_poll_interval_s: float = 0.1
    # `GET /v1/usage` waits up to `projection_wait_s` (inherited) for a meter created a moment
    # ago before answering 404.


def load() -> MeteringSettings:
    return load_settings("metering", MeteringSettings)
