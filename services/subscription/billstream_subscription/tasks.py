"""Background tasks: the wall-clock renewal loop (live mode, and test-mode customers without
a test clock). Test-clock subscriptions renew only when their clock is advanced."""

from __future__ import annotations

import asyncio

from billstream_messaging.host import ServiceHost
from billstream_subscription import service
from billstream_subscription.settings import SubscriptionSettings


async def renew_subscriptions(host: ServiceHost) -> None:
    """Renew due subscriptions in small transactions (`FOR UPDATE SKIP LOCKED`, so replicas
    share the work); sleep `renewal_interval_s` once nothing is due."""
    settings = host.settings
    assert isinstance(settings, SubscriptionSettings)
    assert host.pool is not None
    while True:
        renewed = await service.renew_due(host.pool, host.store, service.wall_clock(),
                                          settings.renewal_batch_size)
        if renewed < settings.renewal_batch_size:
            await asyncio.sleep(settings.renewal_interval_s)
