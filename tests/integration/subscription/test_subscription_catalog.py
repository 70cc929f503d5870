"""Customers, meters, plans and subscriptions over HTTP: shapes, validation errors, events."""

from __future__ import annotations

import pytest

from subscription_helpers import assert_error

pytestmark = pytest.mark.integration

PRO = {
    "code": "pro", "name": "Pro", "currency": "USD", "interval": "month",
    "charges": [
        {"type": "fixed", "amount": "49.00", "timing": "in_advance"},
        {"type": "usage", "meter": "api_calls", "model": "per_unit", "unit_price": "0.002"},
    ],
}


async def _meter(api, code="api_calls", aggregation="sum"):
    r = await api.post("/v1/meters", json={"code": code, "aggregation": aggregation})
    assert r.status_code == 201, r.text
    return r.json()


async def test_customers(api, live_api, tenant, log_of):
    body = {"external_id": "acme-1", "name": "Acme", "email": "billing@acme.test",
            "currency": "usd", "metadata": {"tier": "gold"}}
    r = await api.post("/v1/customers", json=body)
    assert r.status_code == 201, r.text
    cus = r.json()
    assert cus["id"].startswith("cus_")
    assert {k: cus[k] for k in ("object", "external_id", "name", "email", "currency",
                                "test_clock", "metadata", "livemode")} == {
        "object": "customer", "external_id": "acme-1", "name": "Acme",
        "email": "billing@acme.test", "currency": "USD", "test_clock": None,
        "metadata": {"tier": "gold"}, "livemode": False}
    assert cus["created"].endswith("Z")
    assert (await api.get(f"/v1/customers/{cus['id']}")).json() == cus
    assert (await api.get("/v1/customers/acme-1")).json() == cus

    assert_error(await api.post("/v1/customers", json={"external_id": "acme-1"}), 409,
                 "resource_already_exists", "external_id")
    # the same external id is free in live mode (scoped by tenant and environment)
    live = await live_api.post("/v1/customers", json={"external_id": "acme-1"})
    assert live.status_code == 201 and live.json()["livemode"] is True
    assert_error(await live_api.get(f"/v1/customers/{cus['id']}"), 404, "resource_missing")
    assert_error(await api.get("/v1/customers/nobody"), 404, "resource_missing")
    assert_error(await api.post("/v1/customers", json={"currency": "XYZ"}), 400,
                 "parameter_invalid", "currency")
    assert_error(await api.post("/v1/customers", json={"email": "nope"}), 400,
                 "parameter_invalid", "email")
    assert_error(await api.post("/v1/customers", json={"test_clock": "clk_missing"}), 404,
                 "resource_missing", "test_clock")
    assert_error(await live_api.post("/v1/customers", json={"test_clock": "clk_x"}), 400,
                 "test_mode_only", "test_clock")
    assert_error(await api.post("/v1/customers", json={"nickname": "x"}), 400,
                 "parameter_invalid", "nickname")

    second = (await api.post("/v1/customers", json={"name": "No external id"})).json()
    third = (await api.post("/v1/customers", json={})).json()
    listed = (await api.get("/v1/customers", params={"limit": 2})).json()
    assert [c["id"] for c in listed["data"]] == [third["id"], second["id"]]
    assert listed["has_more"] is True

    events = await log_of(tenant["id"], ("customer.created",))
    assert [e["aggregate_id"] for e in events if e["environment"] == "test"] == [
        cus["id"], second["id"], third["id"]]
    assert events[0]["data"] == {
        "customer_id": cus["id"], "external_id": "acme-1", "name": "Acme",
        "email": "billing@acme.test", "currency": "USD", "test_clock_id": None,
        "created_at": cus["created"]}


async def test_meters(api, tenant, log_of):
    r = await api.post("/v1/meters", json={"code": "api_calls", "aggregation": "sum",
                                           "name": "API calls", "field": "n"})
    assert r.status_code == 201, r.text
    meter = r.json()
    assert meter["id"].startswith("mtr_") and meter["object"] == "meter"
    assert (meter["code"], meter["aggregation"], meter["name"], meter["field"],
            meter["livemode"]) == ("api_calls", "sum", "API calls", "n", False)
    assert (await api.get("/v1/meters/api_calls")).json() == meter
    assert (await api.get(f"/v1/meters/{meter['id']}")).json() == meter
    assert_error(await api.post("/v1/meters", json={"code": "api_calls", "aggregation": "max"}),
                 409, "resource_already_exists", "code")
    assert_error(await api.post("/v1/meters", json={"code": "API Calls", "aggregation": "sum"}),
                 400, "parameter_invalid", "code")
    assert_error(await api.post("/v1/meters", json={"code": "x", "aggregation": "avg"}),
                 400, "parameter_invalid", "aggregation")
    assert_error(await api.post("/v1/meters", json={"aggregation": "sum"}),
                 400, "parameter_missing", "code")
    assert_error(await api.get("/v1/meters/nope"), 404, "resource_missing")
    other = await _meter(api, "storage", "max")
    assert [m["code"] for m in (await api.get("/v1/meters")).json()["data"]] == [
        "storage", "api_calls"]
    events = await log_of(tenant["id"], ("meter.created",))
    assert [e["data"]["code"] for e in events] == ["api_calls", "storage"]
    assert events[0]["data"] == {"meter_id": meter["id"], "code": "api_calls",
                                 "name": "API calls", "aggregation": "sum", "field": "n",
                                 "created_at": meter["created"]}
    assert events[1]["aggregate_id"] == other["id"]


async def test_plans(api, tenant, log_of):
    meter = await _meter(api)
    r = await api.post("/v1/plans", json=PRO)
    assert r.status_code == 201, r.text
    plan = r.json()
    assert plan["id"].startswith("plan_") and plan["object"] == "plan"
    assert (plan["code"], plan["name"], plan["currency"], plan["interval"],
            plan["interval_count"], plan["livemode"]) == ("pro", "Pro", "USD", "month", 1, False)
    fixed, usage = plan["charges"]
    assert fixed["id"].startswith("chg_") and usage["id"].startswith("chg_")
    assert {k: fixed[k] for k in ("type", "amount", "timing", "meter", "unit_price")} == {
        "type": "fixed", "amount": "49.00", "timing": "in_advance", "meter": None,
        "unit_price": None}
    assert {k: usage[k] for k in ("type", "meter", "model", "unit_price", "timing", "amount")} == {
        "type": "usage", "meter": "api_calls", "model": "per_unit", "unit_price": "0.002",
        "timing": "in_arrears", "amount": None}
    assert (await api.get("/v1/plans/pro")).json() == plan
    assert (await api.get(f"/v1/plans/{plan['id']}")).json() == plan
    assert [p["id"] for p in (await api.get("/v1/plans")).json()["data"]] == [plan["id"]]

    (event,) = await log_of(tenant["id"], ("plan.created",))
    assert event["aggregate_id"] == plan["id"]
    assert event["data"]["plan"] == {
        "plan_id": plan["id"], "code": "pro", "name": "Pro", "currency": "USD",
        "interval": "month", "interval_count": 1,
        "charges": [
            {"charge_id": fixed["id"], "type": "fixed", "timing": "in_advance",
             "amount": "49.00", "meter": None, "model": None, "unit_price": None},
            {"charge_id": usage["id"], "type": "usage", "timing": "in_arrears", "amount": None,
             "meter": "api_calls", "model": "per_unit", "unit_price": "0.002"},
        ]}

    # a meter may be named by id; integer amounts are fine; the usage default is in arrears
    r = await api.post("/v1/plans", json={
        "code": "basic", "name": "Basic", "currency": "EUR", "interval": "year",
        "interval_count": 2, "charges": [
            {"type": "fixed", "amount": 10},
            {"type": "usage", "meter": meter["id"], "unit_price": "1"}]})
    assert r.status_code == 201, r.text
    basic = r.json()
    assert basic["charges"][0]["amount"] == "10.00"
    assert basic["charges"][0]["timing"] == "in_advance"
    assert basic["charges"][1]["meter"] == "api_calls"
    assert basic["interval_count"] == 2


PLAN_ERRORS = [
    ({"code": "pro"}, 409, "resource_already_exists", "code"),
    ({"code": "Pro Plan"}, 400, "parameter_invalid", "code"),
    ({"currency": "ABC"}, 400, "parameter_invalid", "currency"),
    ({"interval": "fortnight"}, 400, "parameter_invalid", "interval"),
    ({"interval_count": 0}, 400, "parameter_invalid", "interval_count"),
    ({"charges": [{"type": "fixed", "amount": 49.5}]}, 400, "parameter_invalid",
     "charges.0.amount"),
    ({"charges": [{"type": "fixed", "amount": 49.0}]}, 400, "parameter_invalid",
     "charges.0.amount"),
    ({"charges": [{"type": "fixed", "amount": "-1"}]}, 400, "parameter_invalid",
     "charges[0].amount"),
    ({"charges": [{"type": "fixed", "amount": "1.001"}]}, 400, "parameter_invalid",
     "charges[0].amount"),
    ({"charges": [{"type": "fixed"}]}, 400, "parameter_missing", "charges[0].amount"),
    ({"charges": [{"type": "fixed", "amount": "1"},
                  {"type": "usage", "meter": "nope", "unit_price": "1"}]},
     404, "resource_missing", "charges[1].meter"),
    ({"charges": [{"type": "usage", "meter": "api_calls", "unit_price": 0.002}]},
     400, "parameter_invalid", "charges.0.unit_price"),
    ({"charges": [{"type": "usage", "meter": "api_calls", "unit_price": "abc"}]},
     400, "parameter_invalid", "charges.0.unit_price"),
    ({"charges": [{"type": "usage", "meter": "api_calls", "unit_price": "1",
                   "timing": "in_advance"}]}, 400, "parameter_invalid", "charges[0].timing"),
    ({"colour": "red"}, 400, "parameter_invalid", "colour"),
    # amounts an invoice could not hold are refused up front, not a 500 (nor a stuck invoice)
    ({"charges": [{"type": "fixed", "amount": "1E+30"}]}, 400, "parameter_invalid",
     "charges[0].amount"),
    ({"charges": [{"type": "usage", "meter": "api_calls", "unit_price": "0.0000000000001"}]},
     400, "parameter_invalid", "charges[0].unit_price"),
]


async def test_plan_validation(api, tenant, log_of):
    await _meter(api)
    assert (await api.post("/v1/plans", json=PRO)).status_code == 201
    for change, status, code, param in PLAN_ERRORS:
        error = assert_error(
            await api.post("/v1/plans", json={**PRO, "code": "other", **change}),
            status, code, param)
        if param.startswith("charges.0."):  # a JSON float is refused with a clear message
            assert "decimal string" in error["message"], error
    assert len(await log_of(tenant["id"], ("plan.created",))) == 1


async def test_subscriptions(api, live_api, tenant, log_of):
    await _meter(api)
    plan = (await api.post("/v1/plans", json=PRO)).json()
    cus = (await api.post("/v1/customers", json={"external_id": "acme-1",
                                                 "currency": "USD"})).json()
    r = await api.post("/v1/subscriptions", json={"customer": "acme-1", "plan": "pro"})
    assert r.status_code == 201, r.text
    sub = r.json()
    assert sub["id"].startswith("sub_") and sub["object"] == "subscription"
    assert (sub["customer"], sub["status"], sub["test_clock"], sub["livemode"]) == (
        cus["id"], "active", None, False)
    assert sub["plan"] == plan
    assert sub["started_at"] == sub["current_period_start"] == sub["created"]
    assert sub["current_period_end"] > sub["current_period_start"]
    assert (await api.get(f"/v1/subscriptions/{sub['id']}")).json() == sub

    by_ids = (await api.post("/v1/subscriptions",
                             json={"customer": cus["id"], "plan": plan["id"]})).json()
    other_cus = (await api.post("/v1/customers", json={"external_id": "b"})).json()
    other = (await api.post("/v1/subscriptions",
                            json={"customer": "b", "plan": "pro"})).json()
    all_subs = (await api.get("/v1/subscriptions")).json()["data"]
    assert [s["id"] for s in all_subs] == [other["id"], by_ids["id"], sub["id"]]
    mine = (await api.get("/v1/subscriptions", params={"customer": "acme-1"})).json()["data"]
    assert [s["id"] for s in mine] == [by_ids["id"], sub["id"]]
    theirs = (await api.get("/v1/subscriptions",
                            params={"customer": other_cus["id"]})).json()["data"]
    assert [s["id"] for s in theirs] == [other["id"]]
    assert (await api.get("/v1/subscriptions", params={"customer": "x"})).json()["data"] == []

    events = await log_of(tenant["id"], ("subscription.created",))
    assert [e["aggregate_id"] for e in events] == [sub["id"], by_ids["id"], other["id"]]
    snapshot = events[0]["data"]["subscription"]
    assert snapshot["subscription_id"] == sub["id"] and snapshot["customer_id"] == cus["id"]
    assert snapshot["customer_external_id"] == "acme-1" and snapshot["status"] == "active"
    assert snapshot["plan"]["plan_id"] == plan["id"] and len(snapshot["plan"]["charges"]) == 2
    assert snapshot["current_period_end"] == sub["current_period_end"]
    assert snapshot["test_clock_id"] is None

    assert_error(await api.post("/v1/subscriptions", json={"customer": "nobody",
                                                           "plan": "pro"}),
                 404, "resource_missing", "customer")
    assert_error(await api.post("/v1/subscriptions", json={"customer": "acme-1",
                                                           "plan": "nope"}),
                 404, "resource_missing", "plan")
    assert_error(await api.post("/v1/subscriptions", json={"customer": "acme-1"}),
                 400, "parameter_missing", "plan")
    await api.post("/v1/customers", json={"external_id": "euro", "currency": "EUR"})
    assert_error(await api.post("/v1/subscriptions", json={"customer": "euro", "plan": "pro"}),
                 400, "currency_mismatch", "plan")
    # test-mode objects do not exist in live mode
    assert_error(await live_api.post("/v1/subscriptions", json={"customer": "acme-1",
                                                                "plan": "pro"}),
                 404, "resource_missing", "customer")
    assert_error(await api.get("/v1/subscriptions/sub_missing"), 404, "resource_missing")
    assert len(await log_of(tenant["id"], ("subscription.created",))) == 3
