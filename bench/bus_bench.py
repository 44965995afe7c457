"""Bus throughput: AmqpBus on RabbitMQ, against plain aio-pika on the same broker.

Both sides move the same messages (a GenerateBatch of a typical size, JSON) through
the same topology: a durable topic exchange into a quorum queue, persistent messages,
publisher confirms, manual acks.

  publish   --publishers tasks share --n messages, each awaiting the broker's confirm
            before its next publish; no consumer runs meanwhile.
  consume   one subscriber with --concurrency handlers (a handler that only counts)
            drains the queue; timed from the first message handled to the last, so
            connecting and declaring are not part of it.
  baseline  the same two phases with aio-pika alone (one confirm channel, the same
            publisher tasks; one consumer with the same prefetch, decoding and acking
            each message), so the ratios show what the adapter costs on top of the
            broker and the client library.

The four phases run interleaved for --rounds rounds (other load on the machine then
weighs on both sides alike) and the medians are reported. Prints each round, the
medians and the ratios; the last line is

  bus: N msg/s published, M msg/s consumed (persistent, confirmed)

Uses a random prefix and deletes what it declared. Reports only; exits 0.

    .venv/bin/python bench/bus_bench.py [--n 5000] [--publishers 16] [--concurrency 16]
                                        [--prefetch 16] [--rounds 3] [--url amqp://...]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import statistics
import time
import uuid
from typing import Any

import aio_pika

from airoboros.bus_amqp import AmqpBus
from airoboros.contracts import GenerateBatch

DEFAULT_URL = os.environ.get("AIROBOROS_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
GROUP = "bench"


def make_message(i: int) -> GenerateBatch:
    # What the topics service sends: a batch command with a handful of topics.
    return GenerateBatch(
        job_id="job-bench",
        instructor="general",
        batch_size=10,
        topics=[f"topic number {i}-{k}: lighthouses and their keepers" for k in range(5)],
        remaining=1000 - i % 1000,
        headers={"traceparent": f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"},
    )


async def publish_all(publish: Any, messages: list[Any], publishers: int) -> float:
    """Seconds for ``publishers`` tasks to publish ``messages`` (each awaiting confirms)."""

    async def worker(share: list[Any]) -> None:
        for m in share:
            await publish(m)

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(messages[k::publishers]) for k in range(publishers)))
    return time.perf_counter() - t0


class Drain:
    """Counts handled messages; the rate is taken from the first to the last one, so
    that connecting and declaring (start) are not part of it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.handled = 0
        self.first = 0.0
        self.last = 0.0
        self.done = asyncio.Event()

    def tick(self) -> None:
        now = time.perf_counter()
        if self.handled == 0:
            self.first = now
        self.handled += 1
        if self.handled >= self.n:
            self.last = now
            self.done.set()

    async def rate(self) -> float:
        await asyncio.wait_for(self.done.wait(), timeout=300)
        return (self.n - 1) / max(self.last - self.first, 1e-9)


class RawSide:
    """The same work with aio-pika alone: what the broker and the client library give."""

    def __init__(self, args: argparse.Namespace, prefix: str) -> None:
        self.args = args
        self.prefix = prefix
        self.queue_name = f"{prefix}.raw"

    async def open(self) -> None:
        self.conn = await aio_pika.connect_robust(self.args.url)
        self.channel = await self.conn.channel(publisher_confirms=True)
        self.exchange = await self.channel.declare_exchange(
            self.prefix, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await self.channel.declare_queue(
            self.queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(self.exchange, routing_key="raw")

    async def publish(self, m: GenerateBatch) -> None:
        await self.exchange.publish(
            aio_pika.Message(
                m.model_dump_json().encode(),
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=m.message_id,
                type=m.topic,
                content_type="application/json",
                headers={**m.headers, "x-schema-version": m.schema_version},
            ),
            routing_key="raw",
        )

    async def consume(self) -> float:
        channel = await self.conn.channel(publisher_confirms=False)
        await channel.set_qos(prefetch_count=max(self.args.prefetch, self.args.concurrency))
        queue = await channel.declare_queue(
            self.queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        drain = Drain(self.args.n)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            GenerateBatch.model_validate_json(message.body)  # decode, as the bus does
            await message.ack()
            drain.tick()

        tag = await queue.consume(on_message)
        try:
            return await drain.rate()
        finally:
            await queue.cancel(tag)
            await channel.close()

    async def close(self) -> None:
        await self.channel.queue_delete(self.queue_name)
        await self.conn.close()


async def bus_consume(args: argparse.Namespace, prefix: str) -> float:
    consumer = AmqpBus(args.url, prefix=prefix, prefetch=args.prefetch)
    drain = Drain(args.n)

    async def handle(m: GenerateBatch) -> None:
        drain.tick()

    consumer.subscribe(GenerateBatch, handle, concurrency=args.concurrency, group=GROUP)
    await consumer.start()
    try:
        return await drain.rate()
    finally:
        await consumer.close()


async def cleanup(url: str, prefix: str, queues: set[str]) -> None:
    conn = await aio_pika.connect(url)
    try:
        for name in sorted(queues | {f"{prefix}.raw"}):
            async with conn.channel() as ch:
                await ch.queue_delete(name)
        for exchange in (prefix, f"{prefix}.dlx"):
            async with conn.channel() as ch:
                await ch.exchange_delete(exchange)
    finally:
        await conn.close()


async def run(args: argparse.Namespace) -> None:
    prefix = f"bench-{uuid.uuid4().hex[:10]}"
    messages = [make_message(i) for i in range(args.n)]
    size = len(messages[0].model_dump_json())
    print(
        f"{args.n} GenerateBatch messages of {size} bytes, {args.publishers} publishers, "
        f"consumer concurrency {args.concurrency}, prefetch {args.prefetch}, "
        f"{args.rounds} rounds (median); quorum queue, persistent, publisher confirms; "
        f"load {os.getloadavg()[0]:.2f}"
    )
    rates: dict[str, list[float]] = {k: [] for k in ("raw_pub", "raw_con", "pub", "con")}
    raw = RawSide(args, prefix)
    publisher = AmqpBus(args.url, prefix=prefix, prefetch=args.prefetch)
    try:
        await raw.open()
        await publisher.start()
        await publisher.ensure_queue(GenerateBatch, group=GROUP)
        (queue,) = publisher.queue_names(GenerateBatch, GROUP)
        for r in range(args.rounds):
            # Interleaved, so that other load on the machine weighs on both sides alike.
            rates["raw_pub"].append(
                args.n / await publish_all(raw.publish, messages, args.publishers)
            )
            rates["raw_con"].append(await raw.consume())
            rates["pub"].append(
                args.n / await publish_all(publisher.publish, messages, args.publishers)
            )
            queued = await publisher.message_count(queue)
            if queued != args.n:
                print(f"  note: {queued} messages queued after publishing, expected {args.n}")
            rates["con"].append(await bus_consume(args, prefix))
            print(
                f"round {r + 1}: aio-pika {rates['raw_pub'][-1]:6.0f} pub/s "
                f"{rates['raw_con'][-1]:6.0f} con/s | AmqpBus {rates['pub'][-1]:6.0f} pub/s "
                f"{rates['con'][-1]:6.0f} con/s"
            )
    finally:
        declared = publisher.declared_queues
        await publisher.close()
        with contextlib.suppress(Exception):
            await raw.close()
        await cleanup(args.url, prefix, declared)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"aio-pika  publish {med['raw_pub']:8.0f} msg/s, consume {med['raw_con']:8.0f} msg/s")
    print(f"AmqpBus   publish {med['pub']:8.0f} msg/s, consume {med['con']:8.0f} msg/s")
    print(
        f"ratio AmqpBus/aio-pika: publish {med['pub'] / med['raw_pub']:.2f}x, "
        f"consume {med['con'] / med['raw_con']:.2f}x"
    )
    print(
        f"bus: {med['pub']:.0f} msg/s published, {med['con']:.0f} msg/s consumed "
        "(persistent, confirmed)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000, help="messages (default 5000)")
    p.add_argument("--publishers", type=int, default=16, help="publishing tasks (default 16)")
    p.add_argument("--concurrency", type=int, default=16, help="handlers at once (default 16)")
    p.add_argument("--prefetch", type=int, default=16, help="AmqpBus prefetch (default 16)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, median reported (default 3)")
    p.add_argument("--url", default=DEFAULT_URL, help="broker (env AIROBOROS_AMQP_URL)")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
