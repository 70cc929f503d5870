"""Settings of webhook_dispatch: env `BILLSTREAM_WEBHOOK_DISPATCH_X`, falling back to
`BILLSTREAM_X`."""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import Field, model_validator

from billstream_runtime.settings import ServiceSettings, load_settings

from billstream_webhook_dispatch.domain import RetryPolicy


class WebhookDispatchSettings(ServiceSettings):
    service_name: str = "webhook_dispatch"
    # How many times one delivery is attempted before it is `failed` (a manual retry or a
    # replay starts a new cycle of this many attempts).
    delivery_max_attempts: int = Field(10, ge=1)
    # The retry schedule is 5 s, 30 s, 2 min, 10 min, 30 min, 1 h, 2 h, 4 h, ... in units of
    # this base (tests set it to a few milliseconds), capped by delivery_backoff_max_s, ±jitter.
    delivery_backoff_base_s: float = 5.0
    delivery_backoff_max_s: float = 4 * 3600.0
    delivery_backoff_jitter: float = 0.2
    # One HTTP attempt: total timeout; redirects are never followed.
    delivery_timeout_s: float = 10.0
    # Attempts in flight at once in one process (across all endpoints).
    delivery_concurrency: int = Field(16, ge=1)
    # A claimed delivery is leased this long; if the worker dies, it is retried afterwards.
    # Must exceed delivery_timeout_s.
    delivery_lease_s: float = 60.0
    # Fallback poll of the delivery worker (new deliveries wake it through pg_notify).
    delivery_poll_interval_s: float = 1.0
    # Endpoints must resolve to public addresses (no loopback, private or link-local targets:
    # the worker posts from inside your network). The local stack allows them for development.
    allow_private_destinations: bool = False

    @model_validator(mode="after")
    def _lease_outlives_attempt(self) -> "WebhookDispatchSettings":
        if self.delivery_lease_s <= self.delivery_timeout_s:
            raise ValueError("delivery_lease_s must exceed delivery_timeout_s")
        return self

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            max_attempts=self.delivery_max_attempts,
            base_s=self.delivery_backoff_base_s,
            max_s=self.delivery_backoff_max_s,
            jitter=self.delivery_backoff_jitter,
        )


def settings_from_env(environ: Mapping[str, str] | None = None) -> WebhookDispatchSettings:
    return load_settings("webhook_dispatch", WebhookDispatchSettings, environ)
