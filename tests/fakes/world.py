"""All five fake providers at once, the customers the drain tests use, and the environment that
points the service at the fakes."""

from __future__ import annotations

import dataclasses

from fakes.ingest import CREEM_KEY, DODO_KEY, POLAR_KEY, FakeCreem, FakeDodo, FakePolar
from fakes.lemon_squeezy import KEY as LEMON_KEY
from fakes.lemon_squeezy import FakeLemonSqueezy
from fakes.stripe import KEY as STRIPE_KEY
from fakes.stripe import FakeStripe
from usage.v1 import customer_pb2

LEMON_ITEMS = {"tokens": "si_tokens", "calls": "si_calls", "seats": "si_seats", "storage": "si_st"}
POLAR_CUSTOMER = "6f1c2a4e-8b3d-4c5e-9a7f-0d1e2f3a4b5c"  # Polar customer ids are UUIDs
METERS = ("tokens", "calls", "seats", "storage")  # the tests' meters: Creem event names


@dataclasses.dataclass(frozen=True)
class FakeCustomer:
    customer_id: str
    provider: int  # customer_pb2.Provider
    provider_customer_id: str = ""
    subscription_items: dict[str, str] = dataclasses.field(default_factory=dict)


CUSTOMERS = {
    "stripe": FakeCustomer("c_stripe", customer_pb2.PROVIDER_STRIPE, "cus_s"),
    "lemon_squeezy": FakeCustomer(
        "c_lemon", customer_pb2.PROVIDER_LEMON_SQUEEZY, "", dict(LEMON_ITEMS)
    ),
    "polar": FakeCustomer("c_polar", customer_pb2.PROVIDER_POLAR, POLAR_CUSTOMER),
    "dodo_payments": FakeCustomer("c_dodo", customer_pb2.PROVIDER_DODO_PAYMENTS, "dodo_1"),
    "creem": FakeCustomer("c_creem", customer_pb2.PROVIDER_CREEM, "creem_1"),
}


@dataclasses.dataclass
class Fakes:
    stripe: FakeStripe
    lemon_squeezy: FakeLemonSqueezy
    polar: FakePolar
    dodo_payments: FakeDodo
    creem: FakeCreem

    @classmethod
    def start(cls) -> Fakes:
        return cls(
            FakeStripe().start(),
            FakeLemonSqueezy(dict.fromkeys(LEMON_ITEMS.values(), 0)).start(),
            FakePolar({POLAR_CUSTOMER}).start(),
            FakeDodo({"dodo_1"}).start(),
            FakeCreem({"creem_1"}, meters=METERS).start(),
        )

    def all(self) -> list[FakeStripe | FakeLemonSqueezy | FakePolar | FakeDodo | FakeCreem]:
        return [self.stripe, self.lemon_squeezy, self.polar, self.dodo_payments, self.creem]

    def stop(self) -> None:
        for fake in self.all():
            fake.stop()

    def violations(self) -> list[str]:
        return [v for fake in self.all() for v in fake.violations]

    def env(self, timeout: float = 0.5) -> dict[str, str]:
        return {
            "STRIPE_API_KEY": STRIPE_KEY,
            "STRIPE_API_BASE": self.stripe.url,
            "LEMONSQUEEZY_API_KEY": LEMON_KEY,
            "LEMONSQUEEZY_API_BASE": self.lemon_squeezy.url,
            "POLAR_ACCESS_TOKEN": POLAR_KEY,
            "POLAR_API_BASE": self.polar.url,
            "DODO_PAYMENTS_API_KEY": DODO_KEY,
            "DODO_PAYMENTS_API_BASE": self.dodo_payments.url,
            "CREEM_API_KEY": CREEM_KEY,
            "CREEM_API_BASE": self.creem.url,
            "USAGE_PROVIDER_TIMEOUT_SECONDS": str(timeout),
        }
