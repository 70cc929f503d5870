"""Settings of the metering service (env `BILLSTREAM_METERING_X`, falling back to
`BILLSTREAM_X`)."""

from __future__ import annotations

from billstream_runtime.settings import ServiceSettings, load_settings


class MeteringSettings(ServiceSettings):
    service_name: str = "metering"
    # `GET /v1/usage` waits up to `projection_wait_s` (inherited) for a meter created a moment
    # ago before answering 404.


def load() -> MeteringSettings:
    return load_settings("metering", MeteringSettings)
