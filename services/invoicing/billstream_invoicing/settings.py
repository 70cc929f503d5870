"""Settings of invoicing: env `BILLSTREAM_INVOICING_X`, falling back to `BILLSTREAM_X`."""

from __future__ import annotations

from billstream_runtime.settings import ServiceSettings, load_settings


class InvoicingSettings(ServiceSettings):
    """Invoicing has no settings of its own yet; the shared ones cover it."""

    service_name: str = "invoicing"


def settings_from_env() -> InvoicingSettings:
    return load_settings("invoicing", InvoicingSettings)
