"""Settings of the subscription service (env `BILLSTREAM_SUBSCRIPTION_X`, then `BILLSTREAM_X`)."""

from __future__ import annotations

from billstream_runtime.settings import ServiceSettings, load_settings


class SubscriptionSettings(ServiceSettings):
    #: How often the renewal task looks for wall-clock subscriptions whose period has ended.
    renewal_interval_s: float = 5.0
    #: Subscriptions renewed per transaction by the renewal task.
    renewal_batch_size: int = 20


def get_settings() -> SubscriptionSettings:
    return load_settings("subscription", SubscriptionSettings)
