"""Events intake consumes. None yet: intake is the source of the care record, and
learns of other services' facts (published programs) in a later issue."""

from shared.messaging import Subscription

SUBSCRIPTIONS: list[Subscription] = []
