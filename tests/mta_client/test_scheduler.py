"""The scheduled queues and the settlement of attempts: pure, no I/O, no clock."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from mta_client.events import EventKind
from mta_client.outcomes import Answer, Route, settle
from mta_client.queue_view import summarize
from mta_client.retry import RetryPolicy
from mta_client.scheduler import Scheduler, WorkItem, split
from mta_client.spool_format import Done, QueuedMessage, QueuedRecipient, Scheduled

POLICY = RetryPolicy(initial=60.0, max=240.0, max_age=1000.0, jitter=0.0)


def item(id: str = "m1", domain: str = "a.test", due: float = 0.0, **kw: object) -> WorkItem:
    fields: dict[str, object] = {
        "id": id,
        "domain": domain,
        "sender": "s@origin.test",
        "recipients": (f"r@{domain}",),
        "attempts": 0,
        "next_attempt": due,
        "received": 0.0,
        "size": 10,
    }
    fields.update(kw)
    return WorkItem(**fields)  # type: ignore[arg-type]


def test_split_gives_one_item_per_domain_due_with_its_earliest_recipient() -> None:
    message = QueuedMessage(
        "m1",
        "s@origin.test",
        100.0,
        (
            QueuedRecipient("a@X.test", 2, 500.0),
            QueuedRecipient("b@x.test", 1, 300.0),
            QueuedRecipient("c@y.test", 0, 100.0),
        ),
        42,
    )
    items = {i.domain: i for i in split(message)}
    assert set(items) == {"x.test", "y.test"}
    assert items["x.test"].recipients == ("a@X.test", "b@x.test")
    assert (items["x.test"].attempts, items["x.test"].next_attempt) == (2, 300.0)
    assert (items["y.test"].attempts, items["y.test"].next_attempt) == (0, 100.0)


def test_pop_due_takes_only_what_is_due_earliest_first_across_domains() -> None:
    scheduler = Scheduler()
    scheduler.add_all(
        [item("late", "a.test", 50.0), item("early", "b.test", 10.0), item("mid", "a.test", 20.0)]
    )
    assert scheduler.next_due() == 10.0
    assert [i.id for i in scheduler.pop_due(25.0, 10)] == ["early", "mid"]
    assert len(scheduler) == 1
    assert scheduler.next_due() == 50.0
    assert scheduler.pop_due(49.0, 10) == []
    assert [i.id for i in scheduler.pop_due(50.0, 10)] == ["late"]
    assert scheduler.next_due() is None


def test_pop_due_respects_its_limit_and_keeps_the_rest_in_order() -> None:
    scheduler = Scheduler()
    scheduler.add_all(item(f"m{n}", "a.test", float(n)) for n in range(10))
    assert [i.id for i in scheduler.pop_due(100.0, 3)] == ["m0", "m1", "m2"]
    assert [i.id for i in scheduler.pop_due(100.0, 100)] == [f"m{n}" for n in range(3, 10)]


def test_an_earlier_item_added_later_is_due_first() -> None:
    scheduler = Scheduler()
    scheduler.add(item("a", "a.test", 100.0))
    scheduler.add(item("b", "a.test", 5.0))
    assert scheduler.next_due() == 5.0
    assert [i.id for i in scheduler.pop_due(5.0, 10)] == ["b"]
    assert scheduler.counts() == {"a.test": (1, 100.0)}


@given(st.lists(st.tuples(st.sampled_from("abc"), st.floats(0, 1000)), max_size=60), st.data())
def test_pop_due_never_leaves_a_due_item_behind_nor_takes_one_early(
    adds: list[tuple[str, float]], data: st.DataObject
) -> None:
    scheduler = Scheduler()
    for n, (domain, due) in enumerate(adds):
        scheduler.add(item(f"m{n}", f"{domain}.test", due))
    popped: list[WorkItem] = []
    now = 0.0
    while len(scheduler):
        now += data.draw(st.floats(0, 300))
        limit = data.draw(st.integers(1, 5))
        batch = scheduler.pop_due(now, limit)
        assert all(i.next_attempt <= now for i in batch)
        if len(batch) < limit:  # not cut short by the limit: nothing due remains
            next_due = scheduler.next_due()
            assert next_due is None or next_due > now
        popped += batch
    assert sorted(i.id for i in popped) == sorted(f"m{n}" for n in range(len(adds)))
    assert scheduler.next_due() is None


def answers(*pairs: tuple[str, int]) -> list[Answer]:
    status = {2: "delivered", 4: "deferred", 5: "bounced"}
    return [Answer(r, status[code // 100], code, f"{code // 100}.0.0", "text") for r, code in pairs]


def test_settle_marks_delivered_and_bounced_done_and_reschedules_only_the_deferred() -> None:
    work = item(recipients=("ok@a.test", "gone@a.test", "later@a.test"), attempts=0)
    outcome = settle(
        work,
        answers(("ok@a.test", 250), ("gone@a.test", 550), ("later@a.test", 451)),
        Route("127.0.0.2", "site", "mx.a.test", "127.0.0.1"),
        now=0.0,
        policy=POLICY,
        rng=random.Random(1),
    )
    assert outcome.ops == (
        Done("m1", ("ok@a.test", "gone@a.test")),
        Scheduled("m1", ("later@a.test",), 1, 60.0),
    )
    assert [e.kind for e in outcome.events] == [
        EventKind.DELIVERY,
        EventKind.BOUNCE,
        EventKind.TRANSIENT_FAILURE,
    ]
    assert all(e.attempt == 1 and e.source == "127.0.0.2" for e in outcome.events)
    assert [f.recipient for f in outcome.failed] == ["gone@a.test"]
    assert outcome.retry is not None
    assert outcome.retry.recipients == ("later@a.test",)
    assert (outcome.retry.attempts, outcome.retry.next_attempt) == (1, 60.0)


def test_settle_expires_a_deferral_at_max_age_with_a_bounce() -> None:
    work = item(attempts=6, received=0.0)
    outcome = settle(
        work, answers(("r@a.test", 451)), Route(), now=1000.0, policy=POLICY, rng=random.Random()
    )
    assert outcome.ops == (Done("m1", ("r@a.test",)),)
    assert [e.kind for e in outcome.events] == [EventKind.EXPIRATION]
    assert outcome.retry is None
    assert [(f.recipient, f.action) for f in outcome.failed] == [("r@a.test", "failed")]


def test_settle_clamps_the_last_retry_to_the_expiry_time() -> None:
    outcome = settle(
        item(attempts=5),
        answers(("r@a.test", 451)),
        Route(),
        now=900.0,
        policy=POLICY,
        rng=random.Random(),
    )
    assert outcome.retry is not None
    assert outcome.retry.next_attempt == 1000.0


def test_a_null_sender_message_never_gets_a_bounce() -> None:
    outcome = settle(
        item(sender=""),
        answers(("r@a.test", 550)),
        Route(),
        now=0.0,
        policy=POLICY,
        rng=random.Random(),
    )
    assert [e.kind for e in outcome.events] == [EventKind.BOUNCE]
    assert outcome.failed == ()


def test_queue_summary_counts_new_and_deferred_per_domain() -> None:
    messages = [
        QueuedMessage(
            "m1",
            "s@o.test",
            10.0,
            (QueuedRecipient("a@x.test", 0, 10.0), QueuedRecipient("b@y.test", 2, 500.0)),
            5,
        ),
        QueuedMessage("m2", "s@o.test", 20.0, (QueuedRecipient("c@x.test", 1, 90.0),), 5),
    ]
    rows = {row.domain: row for row in summarize(messages)}
    assert (rows["x.test"].messages, rows["x.test"].new, rows["x.test"].deferred) == (2, 1, 1)
    assert rows["x.test"].next_attempt == 10.0
    assert (rows["y.test"].messages, rows["y.test"].new, rows["y.test"].deferred) == (1, 0, 1)
    assert rows["y.test"].as_json()["next_attempt"] == "1970-01-01T00:08:20Z"
