"""Kafka consumer-group membership on stop.

A consumer that stops normally sends LeaveGroup, so the group rebalances at once instead of
waiting for its session to expire. Tansu 0.6.0, the embedded broker, mishandles one ordering
of those leaves: when the group is re-forming (any member just left or joined) and the leader
leaves, the group keeps the departed member as its leader. Every member that joins afterwards
is told to wait for that leader's assignment, which never comes, so the group never forms
again while the broker runs. A service with two workers hits it on about half of its
restarts: one worker's consumer leaves first, the leader second (reproduced in
tests/integration/messaging/test_group_leave.py). A member whose session expires instead is
removed, leader or not, and the group forms without it.

`consumer_leave_group = false` (set by the local stack for the embedded broker) makes
stopping consumers forget their membership without sending LeaveGroup: the broker drops them
when their session times out (2 s on the local stack). Keep the default (true) with Apache
Kafka and any broker without this bug. It applies to every consumer of the process (aiokafka's
group coordinator is patched once, at start-up): the services' event consumers (through
FastStream) and ingestion's Kafka input alike, and to every LeaveGroup aiokafka would send, not
only on stop: `unsubscribe()` (nothing here calls it) and a consumer that exceeded
`max_poll_interval_ms` also leave by session expiry then.

aiokafka sends no LeaveGroup from generation 0 (Tansu's first), so the loss needs a group that
re-formed at least once. tests/integration/messaging/test_group_leave.py records the requests a
stopping consumer sends with the setting on and off, so a future aiokafka that leaves some other
way fails it.
"""

from __future__ import annotations

from aiokafka.consumer.group_coordinator import GroupCoordinator

_LEAVE = GroupCoordinator._maybe_leave_group


async def _forget_membership(self: GroupCoordinator) -> None:
    """What `_maybe_leave_group` does besides sending LeaveGroup."""
    self.reset_generation()


def leave_group_on_stop(enabled: bool) -> None:
    """Whether stopping consumers of this process send LeaveGroup (see the module docstring)."""
    GroupCoordinator._maybe_leave_group = _LEAVE if enabled else _forget_membership


def leaves_group_on_stop() -> bool:
    return GroupCoordinator._maybe_leave_group is _LEAVE
