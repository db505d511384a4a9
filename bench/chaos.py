"""Fault injection against real processes: what is acknowledged, handled, duplicated, lost.

    .venv/bin/python bench/chaos.py [--events 300] [--faults 8] [--db-outage-s 60] [--seed 1]
                                    [--loop | --only-loop]

Scenarios (issue 12): the Jepsen-style event ledger with consumers and nats-server SIGKILLed
at random points (events published directly, then through the transactional outbox); broker
SIGKILL mid-burst and between batches with consumers left running; PostgreSQL stopped under
a running service with the *production* retry defaults (``max_deliver=5``, backoff
1/5/15/60 s); poison input. Every process is real: nats-server (file store,
``sync_interval: always``), PostgreSQL, consumer processes over ``shared.bus``.

Columns: ack/fail/unk = publishes acknowledged / failed (server said not stored) / unknown
(timeout, connection lost); handled = distinct events whose side effect exists; dup =
redeliveries absorbed by the inbox (eff = events with a duplicate side effect, must be 0);
lost = acknowledged but never handled (must be 0); dlq = dead letters; recover = seconds from
the last fault (or the database's return) until every acknowledged event was handled.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shared.embedded import EmbeddedPostgres, NatsServer
from tests.chaos.conftest import create_database
from tests.chaos.ledger import ChaosWorld, Result, broker_restart, db_outage, ledger, poison

HEADER = ["scenario", "faults", "ack/fail/unk", "handled", "dup", "lost", "dlq", "recover s"]


def table(results: list[Result]) -> str:
    rows = [HEADER] + [r.row() for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in rows
    )


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=300)
    parser.add_argument("--faults", type=int, default=8)
    parser.add_argument("--db-outage-s", type=float, default=60.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--loop",
        action="store_true",
        help="also scenarios 4 and 5 in the whole tiny-model loop (vLLM; ~15 min more)",
    )
    parser.add_argument("--only-loop", action="store_true", help="just scenarios 4 and 5")
    args = parser.parse_args()
    started = time.monotonic()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="tuneloop-chaos-") as tmp:
        root = Path(tmp)
        if not args.only_loop:
            await ledger_scenarios(root, args, results)
        if args.loop or args.only_loop:
            from tests.chaos.loop import engine_death, service_crashes

            models = root / "models"
            for scenario in (service_crashes, engine_death):
                outcome = await scenario(root / scenario.__name__, models)
                results.append(outcome.result)
                print(table(results[-1:]).splitlines()[1], flush=True)
    print(f"\nchaos: {len(results)} scenarios in {time.monotonic() - started:.0f}s\n")
    print(table(results))
    for r in results:
        for note in r.notes:
            print(f"  {r.scenario}: {note}")
    bad = [r.scenario for r in results if r.lost or r.duplicate_effects]
    bad += [r.scenario for r in results if r.dead_letters and not r.scenario.startswith("poison")]
    print("\nPASS: nothing acknowledged was lost or done twice" if not bad else f"\nFAIL: {bad}")
    return 1 if bad else 0


async def ledger_scenarios(root: Path, args: argparse.Namespace, results: list[Result]) -> None:
    pg = EmbeddedPostgres(root / "pg").start()
    try:

        async def run(name: str, scenario, **world_kwargs) -> None:  # type: ignore[no-untyped-def]
            world = ChaosWorld(root / name, await create_database(pg), **world_kwargs)
            await world.start()
            try:
                results.append(await scenario(world))
            finally:
                await world.close()
            print(table(results[-1:]).splitlines()[1], flush=True)

        await run(
            "ledger",
            lambda w: ledger(w, events=args.events, faults=args.faults, seed=args.seed),
            consumers=3,
        )
        await run(
            "outbox",
            lambda w: ledger(
                w, events=args.events, faults=args.faults, seed=args.seed, via_outbox=True
            ),
            consumers=3,
        )
        await run("restart", lambda w: broker_restart(w, events=args.events), consumers=2)
        await run("poison", lambda w: poison(w, good=20), consumers=1, max_deliver=4)
    finally:
        pg.stop()
    nats_server = NatsServer(root / "nats-db").start()
    try:
        results.append(
            await db_outage(root / "db", nats_server.url, events=40, outage_s=args.db_outage_s)
        )
    finally:
        nats_server.stop()


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
