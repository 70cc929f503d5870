"""Consumer groups survive a service restart when its consumers stop without LeaveGroup
(`consumer_leave_group = false`, the local stack's setting for the embedded broker).

With LeaveGroup, Tansu 0.6.0 loses the group when the follower leaves before the leader: the
next members are told to wait for the departed leader's assignment (see
billstream_messaging.groups). Checked by hand with `leave_group_on_stop(True)`: this test then
fails in 3 runs of 3, the first new member's join never completing; without LeaveGroup it
passes, the group forming once the old sessions expire."""

from __future__ import annotations

import asyncio
import os

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from billstream_messaging.groups import leave_group_on_stop, leaves_group_on_stop
from billstream_testing.fixtures import unique, use_containers
from billstream_testing.waiting import eventually

pytestmark = pytest.mark.integration
PARTITIONS = 8


@pytest.fixture(autouse=True)
def _restore_leave_setting():
    """The setting is process-wide (hosts started by earlier tests set it): each test here
    sets what it needs and leaves the process as it found it."""
    before = leaves_group_on_stop()
    yield
    leave_group_on_stop(before)


async def _topic(bootstrap: str, partitions: int = PARTITIONS) -> str:
    topic = unique("t")
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, partitions, 1)])
    finally:
        await admin.close()
    return topic


def _session() -> tuple[int, int]:
    """(session timeout, heartbeat) ms: the local stack's on the embedded broker; Apache
    Kafka refuses sessions under 6 s."""
    external = os.environ.get("BILLSTREAM_TEST_KAFKA_BOOTSTRAP") or use_containers()
    return (6000, 1000) if external else (2000, 500)


class _Member(ConsumerRebalanceListener):
    def __init__(self, bootstrap: str, group: str, topic: str) -> None:
        session, heartbeat = _session()
        self.partitions: set[int] = set()
        self.consumer = AIOKafkaConsumer(
            bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
            session_timeout_ms=session, heartbeat_interval_ms=heartbeat)
        self.consumer.subscribe([topic], listener=self)
        self._poll: asyncio.Task | None = None

    async def on_partitions_revoked(self, revoked) -> None:
        self.partitions = set()

    async def on_partitions_assigned(self, assigned) -> None:
        self.partitions = {tp.partition for tp in assigned}

    async def start(self) -> None:
        await self.consumer.start()
        self._poll = asyncio.create_task(self._polling())

    async def _polling(self) -> None:
        while True:
            await self.consumer.getmany(timeout_ms=100)

    async def stop(self) -> None:
        if self._poll is not None:
            self._poll.cancel()
        await self.consumer.stop()


async def _all_assigned(members: list[_Member], timeout: float,
                        partitions: int = PARTITIONS) -> None:
    """Until every member holds partitions and together they hold each one exactly once."""
    async def assigned() -> bool:
        return (all(m.partitions for m in members)
                and sorted(p for m in members for p in m.partitions) == list(range(partitions)))

    await eventually(assigned, timeout=timeout, message="every member assigned")


async def test_a_group_forms_again_after_its_follower_then_its_leader_stopped(
        kafka_bootstrap: str):
    topic, group = await _topic(kafka_bootstrap), unique("g")
    leave_group_on_stop(False)
    running: list[_Member] = []
    try:
        leader = _Member(kafka_bootstrap, group, topic)
        running.append(leader)
        await leader.start()
        await _all_assigned([leader], 30)
        follower = _Member(kafka_bootstrap, group, topic)  # joins the leader's group
        running.append(follower)
        await follower.start()
        await _all_assigned([leader, follower], 30)
        for member in (follower, leader):  # the order that loses the group with LeaveGroup
            await member.stop()
            running.remove(member)
        again = [_Member(kafka_bootstrap, group, topic) for _ in range(2)]
        for member in again:  # one after the other, as a service's workers come up
            running.append(member)
            # aiokafka's start waits for the first join: on a lost group it never returns
            await asyncio.wait_for(member.start(), 30)
        await _all_assigned(again, 30)
    finally:
        for member in running:
            await member.stop()


async def test_a_stopping_consumer_sends_leavegroup_only_when_the_setting_says_so(
        kafka_bootstrap: str):
    """Whatever route aiokafka takes to leave: every request a member's coordinator sends is
    recorded, and its stop sends LeaveGroup with the setting on and none with it off (its
    membership is forgotten either way). Two members, so that the group has re-formed once:
    aiokafka sends no LeaveGroup from generation 0, Tansu's first."""
    topic = await _topic(kafka_bootstrap, 2)
    for leave in (True, False, True):
        leave_group_on_stop(leave)
        assert leaves_group_on_stop() is leave
        group = unique("g")
        first, second = _Member(kafka_bootstrap, group, topic), _Member(kafka_bootstrap,
                                                                       group, topic)
        await first.start()
        try:
            await second.start()
            try:
                await _all_assigned([first, second], 30, partitions=2)
                coordinator = second.consumer._coordinator
                assert coordinator.generation > 0
                sent: list[str] = []
                send = coordinator._send_req

                async def recording(request, send=send, sent=sent):
                    sent.append(type(request).__name__)
                    return await send(request)

                coordinator._send_req = recording
            finally:
                await second.stop()
        finally:
            await first.stop()
        assert any(name.startswith("LeaveGroupRequest") for name in sent) is leave, sent
        assert coordinator.generation < 0  # forgotten: a later start joins afresh


async def test_a_host_applies_the_setting_when_it_starts(fresh_database, kafka_bootstrap):
    from test_backbone import build_host  # the notes service of the backbone tests

    for leave in (False, True):
        host = build_host(fresh_database, kafka_bootstrap, unique("notes"), unique("g"))
        host.settings = host.settings.model_copy(update={"consumer_leave_group": leave})
        await host.start(serve_http=False)
        try:
            assert leaves_group_on_stop() is leave
        finally:
            await host.stop()
