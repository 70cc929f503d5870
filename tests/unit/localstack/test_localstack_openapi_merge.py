from __future__ import annotations

from typing import Any

from billstream_localstack.openapi_merge import merge_openapi


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _get(schema: dict[str, Any]) -> dict[str, Any]:
    content = {"application/json": {"schema": schema}}
    return {"get": {"responses": {"200": {"description": "ok", "content": content}}}}


def _schema_of(doc: dict[str, Any], path: str) -> dict[str, Any]:
    response = doc["paths"][path]["get"]["responses"]["200"]
    return response["content"]["application/json"]["schema"]


def test_one_31_document_titled_billstream_api() -> None:
    doc = merge_openapi({})
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["title"] == "Billstream API"
    assert doc["paths"] == {}


def test_keeps_only_paths_the_route_table_sends_to_the_service() -> None:
    specs = {
        "subscription": {
            "paths": {
                "/v1/customers": _get({}),
                "/v1/customers/{customer_id}": _get({}),
                "/admin/v1/tenants": _get({}),
                "/v1/invoices": _get({}),  # routed to invoicing, not here
                "/readyz": _get({}),  # not routed at all
            }
        },
        "payments": {"paths": {"/v1/customers/{customer_id}/payment_methods": _get({})}},
    }
    doc = merge_openapi(specs)
    assert list(doc["paths"]) == [
        "/v1/customers",
        "/v1/customers/{customer_id}",
        "/admin/v1/tenants",
        "/v1/customers/{customer_id}/payment_methods",
    ]


def test_identical_schemas_are_merged() -> None:
    error = {"type": "object", "properties": {"code": {"type": "string"}}}
    specs = {
        "subscription": {
            "paths": {"/v1/customers": _get(_ref("Error"))},
            "components": {"schemas": {"Error": error}},
        },
        "invoicing": {
            "paths": {"/v1/invoices": _get(_ref("Error"))},
            "components": {"schemas": {"Error": dict(error)}},
        },
    }
    doc = merge_openapi(specs)
    assert doc["components"]["schemas"] == {"Error": error}
    assert _schema_of(doc, "/v1/invoices") == _ref("Error")


def test_conflicting_schema_is_prefixed_and_its_references_follow() -> None:
    specs = {
        "subscription": {
            "paths": {"/v1/customers": _get(_ref("Item"))},
            "components": {"schemas": {"Item": {"title": "customer item"}}},
        },
        "invoicing": {
            "paths": {"/v1/invoices": _get(_ref("Item"))},
            "components": {
                "schemas": {
                    "Item": {"title": "invoice item"},
                    "Page": {"type": "array", "items": _ref("Item")},
                    "Pet": {
                        "oneOf": [_ref("Item")],
                        "discriminator": {
                            "propertyName": "kind",
                            "mapping": {"item": "#/components/schemas/Item"},
                        },
                    },
                }
            },
        },
    }
    doc = merge_openapi(specs)
    schemas = doc["components"]["schemas"]
    assert schemas["Item"] == {"title": "customer item"}
    assert schemas["InvoicingItem"] == {"title": "invoice item"}
    assert schemas["Page"]["items"] == _ref("InvoicingItem")
    assert schemas["Pet"]["discriminator"]["mapping"] == {
        "item": "#/components/schemas/InvoicingItem"
    }
    assert _schema_of(doc, "/v1/customers") == _ref("Item")
    assert _schema_of(doc, "/v1/invoices") == _ref("InvoicingItem")


def test_schema_that_differs_only_through_a_renamed_reference_is_renamed_too() -> None:
    """`List` looks identical in both services, but its `Item` is not the same schema."""
    list_schema = {"type": "array", "items": _ref("Item")}
    specs = {
        "subscription": {
            "components": {"schemas": {"Item": {"title": "a"}, "List": list_schema}},
        },
        "metering": {
            "components": {"schemas": {"Item": {"title": "b"}, "List": dict(list_schema)}},
        },
    }
    schemas = merge_openapi(specs)["components"]["schemas"]
    assert schemas["List"] == {"type": "array", "items": _ref("Item")}
    assert schemas["MeteringList"] == {"type": "array", "items": _ref("MeteringItem")}
    assert schemas["MeteringItem"] == {"title": "b"}


def test_prefixed_name_that_is_taken_gets_a_number() -> None:
    specs = {
        "subscription": {
            "components": {"schemas": {"Item": {"title": "a"}, "WebhookDispatchItem": {}}}
        },
        "webhook_dispatch": {"components": {"schemas": {"Item": {"title": "b"}}}},
    }
    schemas = merge_openapi(specs)["components"]["schemas"]
    assert schemas["WebhookDispatchItem2"] == {"title": "b"}


def test_other_component_sections_and_tags_merge_first_wins() -> None:
    bearer = {"type": "http", "scheme": "bearer"}
    specs = {
        "subscription": {
            "components": {"securitySchemes": {"HTTPBearer": bearer}},
            "tags": [{"name": "customers"}],
        },
        "invoicing": {
            "components": {"securitySchemes": {"HTTPBearer": dict(bearer)}},
            "tags": [{"name": "invoices"}, {"name": "customers", "description": "dup"}],
        },
    }
    doc = merge_openapi(specs)
    assert doc["components"]["securitySchemes"] == {"HTTPBearer": bearer}
    assert doc["tags"] == [{"name": "customers"}, {"name": "invoices"}]
