"""Public API request and response models of the subscription service. They describe the
wire (and generate the OpenAPI document); they are never used as tables or events."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Generic, Literal, TypeVar

from pydantic import AfterValidator, AwareDatetime, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic import WithJsonSchema

from billstream_runtime.money import MoneyError, parse_decimal

T = TypeVar("T")


def _decimal_input(value: Any) -> Decimal:
    """Decimal strings and JSON integers only: a JSON number with a fraction has already
    become a binary float by the time it is parsed, so it is refused instead of guessed at."""
    if isinstance(value, float):
        raise ValueError(
            'must be a decimal string such as "49.00" or an integer, not a JSON number with a '
            "fraction (floats cannot represent money exactly)"
        )
    if isinstance(value, bool) or not isinstance(value, (str, int, Decimal)):
        raise ValueError('must be a decimal string such as "49.00"')
    try:
        return parse_decimal(value.strip() if isinstance(value, str) else value)
    except MoneyError as exc:
        raise ValueError(f'must be a decimal string such as "49.00" ({exc})') from exc


DecimalInput = Annotated[
    Decimal,
    BeforeValidator(_decimal_input),
    WithJsonSchema({"anyOf": [{"type": "string", "pattern": r"^\d+(\.\d+)?$"},
                              {"type": "integer", "minimum": 0}],
                    "description": "A decimal string (or an integer); never a float",
                    "examples": ["49.00"]}),
]
UtcDatetime = Annotated[AwareDatetime, AfterValidator(lambda v: v.astimezone(UTC))]
Text = Annotated[str, Field(min_length=1, max_length=500)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------- requests


class CreateTenant(_Request):
    name: Text


class CreateApiKey(_Request):
    environment: Literal["test", "live"]
    kind: Literal["secret", "publishable"]


class CreateTestClock(_Request):
    frozen_time: UtcDatetime
    name: Text | None = None


class AdvanceTestClock(_Request):
    frozen_time: UtcDatetime


class CreateCustomer(_Request):
    external_id: Annotated[str, Field(min_length=1, max_length=255)] | None = None
    name: Text | None = None
    email: Annotated[str, Field(max_length=320)] | None = None
    currency: Annotated[str, Field(min_length=3, max_length=3)] | None = None
    test_clock: str | None = None
    metadata: Annotated[dict[str, Any], Field(max_length=50)] | None = None


class CreateMeter(_Request):
    code: str
    aggregation: Literal["sum", "count", "max"]
    name: Text | None = None
    field: Annotated[str, Field(min_length=1, max_length=200)] | None = None


class ChargeIn(_Request):
    type: Literal["fixed", "usage"]
    timing: Literal["in_advance", "in_arrears"] | None = None
    amount: DecimalInput | None = None
    meter: str | None = None
    model: Literal["per_unit"] | None = None
    unit_price: DecimalInput | None = None


class CreatePlan(_Request):
    code: str
    name: Text
    currency: Annotated[str, Field(min_length=3, max_length=3)]
    interval: Literal["day", "week", "month", "year"]
    interval_count: int = 1
    charges: Annotated[list[ChargeIn], Field(max_length=50)] = []


class CreateSubscription(_Request):
    customer: Annotated[str, Field(min_length=1)]
    plan: Annotated[str, Field(min_length=1)]


# ---------------------------------------------------------------- responses


class ListOut(BaseModel, Generic[T]):
    object: Literal["list"] = "list"
    data: list[T]
    has_more: bool


class KeyPair(BaseModel):
    secret_key: str
    publishable_key: str


class TenantKeys(BaseModel):
    test: KeyPair
    live: KeyPair


class TenantOut(BaseModel):
    id: str
    object: Literal["tenant"] = "tenant"
    name: str
    created: datetime


class TenantCreatedOut(TenantOut):
    keys: TenantKeys = Field(description="The tenant's first keys; shown only in this response")


class ApiKeyOut(BaseModel):
    id: str
    object: Literal["api_key"] = "api_key"
    tenant: str
    environment: Literal["test", "live"]
    kind: Literal["secret", "publishable"]
    key_prefix: str
    livemode: bool
    created: datetime
    revoked: datetime | None = None


class ApiKeyCreatedOut(ApiKeyOut):
    key: str = Field(description="The full key; shown only in this response")


class TestClockOut(BaseModel):
    __test__ = False

    id: str
    object: Literal["test_clock"] = "test_clock"
    name: str | None
    frozen_time: datetime
    status: Literal["ready"]
    livemode: bool
    created: datetime


class CustomerOut(BaseModel):
    id: str
    object: Literal["customer"] = "customer"
    external_id: str | None
    name: str | None
    email: str | None
    currency: str | None
    test_clock: str | None
    metadata: dict[str, Any]
    livemode: bool
    created: datetime


class MeterOut(BaseModel):
    id: str
    object: Literal["meter"] = "meter"
    code: str
    name: str | None
    aggregation: Literal["sum", "count", "max"]
    field: str | None
    livemode: bool
    created: datetime


class ChargeOut(BaseModel):
    id: str
    object: Literal["charge"] = "charge"
    type: Literal["fixed", "usage"]
    timing: Literal["in_advance", "in_arrears"]
    amount: str | None = Field(None, description="Fixed charges: decimal string, major units")
    meter: str | None = Field(None, description="Usage charges: the meter code")
    model: Literal["per_unit"] | None = None
    unit_price: str | None = Field(None, description="Usage charges: decimal string per unit")


class PlanOut(BaseModel):
    id: str
    object: Literal["plan"] = "plan"
    code: str
    name: str
    currency: str
    interval: Literal["day", "week", "month", "year"]
    interval_count: int
    charges: list[ChargeOut]
    livemode: bool
    created: datetime


class SubscriptionOut(BaseModel):
    id: str
    object: Literal["subscription"] = "subscription"
    customer: str
    plan: PlanOut
    status: Literal["active", "past_due", "canceled"]
    current_period_start: datetime
    current_period_end: datetime
    started_at: datetime
    test_clock: str | None
    livemode: bool
    created: datetime
