"""Random SIGKILLs of pool children and of a whole node while locked tasks run.

Three nodes (prefork, concurrency 2) on a Redis broker with the visibility heartbeat
on (visibility timeout 10 s) run 60 ``chaos.locked`` tasks over 4 lock keys, each
sleeping 0.2-2 s inside its lock. At most ``WINDOW`` tasks are unfinished at a time,
so contention stays realistic rather than a retry storm. During the run the test
SIGKILLs 5 pool children that are inside a body and one whole node (its process
group), and starts a replacement node. Then:

- every task completed exactly once (one completion; a suppressed duplicate is fine)
  or is in the DLQ with reason ``worker_lost`` (crash budget spent); none is lost;
- no two bodies of one lock key overlapped: the bodies' own INCR/DECR detector saw
  none, the recorded intervals (a killed body ends when it was killed) are disjoint,
  and fencing tokens increase in the order the bodies ran;
- the recovery time of each kill (kill -> the killed task's next start) is reported.

Victims are chosen inside their body with at least ``MARGIN_S`` left, so a kill never
lands between a body's end and its ack (that window legitimately runs a task again:
its result was not stored yet). ``CHAOS_SEED`` replays a run's choices of tasks and
kill points (the victims depend on timing too).

No loss is excused. A node SIGKILLed while messages are handed to it used to lose
them with kombu's own Redis consumption (BRPOP pops a message before kombu records it
in ``unacked``; celery/celery#7950); the heartbeat's reliable fetch records a message
in the command that pops it, so a sweep brings back whatever a dead node held. The
test publishes nothing ``PUBLISH_GAP_S`` before and after a node kill all the same,
so its own publications do not make up the whole of that window.
"""

from __future__ import annotations

import itertools
import os
import random
import re
import signal
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from datetime import datetime
from typing import Any

import pytest
from celery.result import AsyncResult

from celery_resilience import CrashBudgetExceeded

from .conftest import ChaosCluster, Node, wait_until

pytestmark = pytest.mark.chaos

TASKS = 60
KEYS = 4
WINDOW = 12  # tasks published and not finished, at most
CHILD_KILLS = 5
NODE_KILLS = 1
VISIBILITY_TIMEOUT = 10.0
MARGIN_S = 0.4  # a victim's body has at least this long left when it is killed
ENDED_GAP_S = 0.3  # a node is not killed this soon after one of its bodies ended
QUIET_S = 2.0  # nothing queued, unacked, running or changing for this long: the run is over
RUN_TIMEOUT_S = 150.0
# The test publishes nothing this long before and after a node kill: a dying node's
# consumer takes messages off the queue for ~5-20 ms after the signal.
PUBLISH_GAP_S = 0.25

_LOG_LINE = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}): \w+/[^\]]+\] (.*)$")


class Chaos:
    """Publishes the tasks, follows the bodies' log and kills at the planned points."""

    def __init__(self, cluster: ChaosCluster, rng: random.Random) -> None:
        self.cluster = cluster
        self.rng = rng
        self.keys = [f"k{i}" for i in range(KEYS)]
        self.plan = [(self.keys[n % KEYS], round(rng.uniform(0.2, 2.0), 2)) for n in range(TASKS)]
        rng.shuffle(self.plan)
        # Kill i is due once this many tasks were published (so bodies are running).
        triggers = [("child", n) for n in rng.sample(range(6, TASKS - 6), CHILD_KILLS)]
        triggers += [("node", rng.randint(14, 34)) for _ in range(NODE_KILLS)]
        self.pending = sorted(triggers, key=lambda kill: kill[1])
        self.results: list[AsyncResult] = []
        self.published_at: dict[str, float] = {}
        self.final: dict[str, str] = {}
        self.running: dict[str, dict[str, Any]] = {}  # run id -> its start record
        self.last_end: dict[str, float] = {}  # node -> when a body of it last ended
        self.seen = 0
        self.kills: list[dict[str, Any]] = []
        self.replacements: list[Node] = []
        self.last_change = time.monotonic()
        # The test's own publications keep clear of a node kill (see the module doc).
        self.last_publish = 0.0
        self.quiet_until = 0.0

    # -- following the run ------------------------------------------------

    def ingest(self) -> None:
        for entry in self.cluster.log(self.seen):
            self.seen += 1
            self.last_change = time.monotonic()
            if entry["ev"] == "start":
                if not self.was_killed(entry):  # a start read only after its kill
                    self.running[entry["run"]] = entry
            else:
                self.running.pop(entry["run"], None)
                self.last_end[entry["node"]] = entry["t"]

    def was_killed(self, entry: dict[str, Any]) -> bool:
        return any(
            kill["at"] >= entry["t"]
            and (
                (kill["kind"] == "child" and kill["pid"] == entry["pid"])
                or (kill["kind"] == "node" and kill["node"] == entry["node"])
            )
            for kill in self.kills
        )

    def unfinished(self) -> list[AsyncResult]:
        return [r for r in self.results if r.id not in self.final]

    def publish(self) -> None:
        if time.time() < self.quiet_until:
            return
        while len(self.results) < TASKS and len(self.unfinished()) < WINDOW:
            key, seconds = self.plan[len(self.results)]
            result = self.cluster.send_locked(key, seconds)
            self.published_at[result.id] = self.last_publish = time.time()
            self.results.append(result)
            self.last_change = time.monotonic()

    def poll_states(self) -> None:
        for result in self.unfinished():
            state = result.state
            if state in {"SUCCESS", "FAILURE"}:
                self.final[result.id] = state
                self.last_change = time.monotonic()

    def live_nodes(self) -> dict[str, Node]:
        return {n.name: n for n in self.cluster.nodes if n.alive and n.killed_at is None}

    def killable(self, entry: dict[str, Any], now: float) -> bool:
        """Inside its body (past the overlap detector) with ``MARGIN_S`` left."""
        return now - entry["t"] >= 0.05 and entry["t"] + entry["secs"] - now >= MARGIN_S

    # -- the kills --------------------------------------------------------

    def kill_child(self) -> bool:
        now, live = time.time(), self.live_nodes()
        candidates = [
            e for e in self.running.values() if e["node"] in live and self.killable(e, now)
        ]
        if not candidates:
            return False
        victim = self.rng.choice(sorted(candidates, key=lambda e: e["run"]))
        at = time.time()
        os.kill(victim["pid"], signal.SIGKILL)
        self.kills.append({"kind": "child", "at": at, "node": victim["node"], "pid": victim["pid"]})
        self.running.pop(victim["run"])
        return True

    def kill_node(self) -> bool:
        now, live = time.time(), self.live_nodes()
        bodies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for entry in self.running.values():
            if entry["node"] in live:
                bodies[entry["node"]].append(entry)
        eligible = [
            name
            for name, entries in bodies.items()
            if all(self.killable(e, now) for e in entries)
            and now - self.last_end.get(name, 0.0) >= ENDED_GAP_S
        ]
        if not eligible or now - self.last_publish < PUBLISH_GAP_S:
            return False
        node = live[self.rng.choice(sorted(eligible))]
        at = time.time()
        self.quiet_until = at + PUBLISH_GAP_S
        node.kill()
        self.kills.append({"kind": "node", "at": at, "node": node.name, "pid": node.process.pid})
        for run in [run for run, e in self.running.items() if e["node"] == node.name]:
            self.running.pop(run)
        self.replacements.append(self.cluster.replace(node))  # a new pod comes up
        return True

    def step(self) -> None:
        self.ingest()
        self.publish()
        if self.pending and len(self.results) >= self.pending[0][1]:
            kind = self.pending[0][0]
            if (self.kill_child if kind == "child" else self.kill_node)():
                self.pending.pop(0)
                self.last_change = time.monotonic()
        for node in self.replacements:
            node.is_ready()  # fails at once if a replacement died
        self.poll_states()
        if self.running or not self.cluster.settled():
            self.last_change = time.monotonic()

    def done(self) -> bool:
        """Every task finished; or whatever is left can never run (nothing is queued,
        unacked or running, and nothing changed for ``QUIET_S``)."""
        if len(self.results) < TASKS or self.pending:
            return False
        return len(self.final) == TASKS or time.monotonic() - self.last_change >= QUIET_S

    def report(self) -> str:
        unfinished = [r.id for r in self.unfinished()]
        return (
            f"published {len(self.results)}/{TASKS}, final {len(self.final)}, "
            f"kills done {self.kills}, kills pending {self.pending}, unfinished {unfinished}\n"
            + self.cluster.report(*unfinished[:6])
        )


def end_of_each_run(
    log: list[dict[str, Any]], kills: list[dict[str, Any]]
) -> tuple[dict[str, float], dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """When each body ended, which kill ended each killed one, and unexplained ones.

    A body with no end record must have been killed: its process (child kill) or its
    node (node kill) at or after its start; it ended when it was killed.
    """
    ended = {e["run"]: e["t"] for e in log if e["ev"] == "end"}
    killed_by: dict[str, dict[str, Any]] = {}
    unexplained = []
    for start in (e for e in log if e["ev"] == "start" and e["run"] not in ended):
        hits = [
            k
            for k in kills
            if k["at"] >= start["t"]
            and (
                (k["kind"] == "child" and k["pid"] == start["pid"])
                or (k["kind"] == "node" and k["node"] == start["node"])
            )
        ]
        if hits:
            kill = min(hits, key=lambda k: k["at"])
            ended[start["run"]] = kill["at"]
            killed_by[start["run"]] = kill
        else:
            unexplained.append(start)
    return ended, killed_by, unexplained


def traces(cluster: ChaosCluster, task_id: str, published_at: float) -> list[tuple[float, str]]:
    """(time, what) of everything known about ``task_id``: its publication by the test
    and every worker log line naming it, oldest first."""
    found = [(published_at, "published by the test")]
    for node in cluster.nodes:
        for line in node.text().splitlines():
            match = _LOG_LINE.match(line)
            if match and task_id in line:
                at = datetime.strptime(match[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
                found.append((at, f"{node.name}: {match[2][:160]}"))
    return sorted(found)


def test_random_kills_of_children_and_a_node_lose_and_duplicate_nothing(
    chaos_clusters: Callable[..., ChaosCluster], chaos_summary: dict[str, Any]
) -> None:
    """60 locked tasks, 5 child kills and a node kill: each completes once or is dead-
    lettered, no lock key is ever held by two bodies, recovery times are reported."""
    seed = int(os.environ.get("CHAOS_SEED") or random.randrange(2**32))
    print(f"\nchaos seed {seed} (CHAOS_SEED={seed} replays the plan)")
    cluster = chaos_clusters("random", visibility_timeout=VISIBILITY_TIMEOUT)
    cluster.start("n1", "n2", "n3")
    chaos = Chaos(cluster, random.Random(seed))

    started = time.monotonic()
    wait_until(
        lambda: chaos.step() or chaos.done(),
        f"{TASKS} tasks to finish with {CHILD_KILLS} child and {NODE_KILLS} node kills",
        chaos.report,
        timeout=RUN_TIMEOUT_S,
        poll=0.05,
    )
    for node in chaos.replacements:
        cluster.wait_ready(node)
    cluster.wait_settled(chaos.report)
    run_seconds = time.monotonic() - started
    time.sleep(1.0)  # grace: a stray copy would start now
    chaos.poll_states()

    # -- what happened -----------------------------------------------------
    log = cluster.log()
    results = {r.id: r for r in chaos.results}
    plan = dict(zip(results, chaos.plan, strict=True))
    completions = cluster.completions()
    dead = {entry.task_id: entry for entry in cluster.dead_letters()}
    ended, killed_by, unexplained = end_of_each_run(log, chaos.kills)
    starts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in log:
        if entry["ev"] == "start":
            starts[entry["id"]].append(entry)

    duplicates = sorted(tid for tid in results if completions.get(tid, 0) > 1)
    missing = sorted(tid for tid in results if completions.get(tid, 0) == 0 and tid not in dead)
    in_dlq = sorted(tid for tid in results if tid in dead)
    lost, evidence = missing, []
    for tid in missing:
        found = traces(cluster, tid, chaos.published_at[tid])
        evidence.append(
            f"{tid} LOST:\n    "
            + "\n    ".join(f"{datetime.fromtimestamp(at)} {what}" for at, what in found[-6:])
        )

    wrong: list[str] = []
    for tid, result in results.items():
        done, state = completions.get(tid, 0), chaos.final.get(tid, "unfinished")
        if done == 1 and (state != "SUCCESS" or tid in dead or result.result != plan[tid][1]):
            wrong.append(f"{tid}: completed once but {state} {result.result!r}, DLQ {tid in dead}")
        if done == 0 and tid in dead:
            entry = dead[tid]
            crashes = sum(1 for s in starts[tid] if s["run"] in killed_by)
            if (
                entry.reason != "worker_lost"
                or state != "FAILURE"
                or not isinstance(result.result, CrashBudgetExceeded)
                or crashes < 1
            ):
                wrong.append(f"{tid}: DLQ {entry.reason}, {state}, {crashes} killed bodies")

    # Overlaps: the live detector, then the intervals, then the fencing tokens.
    overlaps = cluster.overlaps()
    interval_overlaps = []
    token_disorder = []
    by_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for entry in log:
        if entry["ev"] == "start":
            by_key[entry["key"]].append(entry)
    for key, runs in by_key.items():
        runs.sort(key=lambda e: e["t"])
        latest_end, latest = 0.0, None
        for run in runs:
            if run["t"] < latest_end:
                interval_overlaps.append((key, latest, run["run"]))
            end = ended.get(run["run"], float("inf"))
            if end > latest_end:
                latest_end, latest = end, run["run"]
        tokens = [run["token"] for run in runs]
        token_disorder += [(key, a, b) for a, b in itertools.pairwise(tokens) if not a < b]

    # Recovery: kill -> the next start of each task the kill interrupted.
    recoveries = []
    for kill in chaos.kills:
        runs = [run for run, by in killed_by.items() if by is kill]
        victims = sorted({s["id"] for s in log if s["ev"] == "start" and s["run"] in runs})
        for tid in victims:
            later = [s["t"] for s in starts[tid] if s["t"] > kill["at"]]
            received = [
                at
                for at, what in traces(cluster, tid, chaos.published_at[tid])
                if at > kill["at"] and what.endswith(" received")
            ]
            recoveries.append(
                {
                    "kind": kill["kind"],
                    "node": kill["node"],
                    "task": tid,
                    "recovery_s": round(min(later) - kill["at"], 2) if later else None,
                    # kill -> the message delivered again (the rest is waiting for its lock)
                    "redelivered_s": round(min(received) - kill["at"], 2) if received else None,
                    "outcome": (
                        "dlq" if tid in dead else "completed" if completions.get(tid, 0) else "lost"
                    ),
                }
            )

    events: Counter[str] = Counter()
    for tid in results:
        events.update(cluster.events(tid))
    completed_once = sum(completions.get(t, 0) == 1 for t in results)
    lines = [
        f"seed {seed}: {TASKS} tasks over {KEYS} keys on 3 nodes, visibility timeout "
        f"{VISIBILITY_TIMEOUT:g} s, finished and settled in {run_seconds:.1f} s",
        f"kills: {sum(k['kind'] == 'child' for k in chaos.kills)} children, "
        f"{sum(k['kind'] == 'node' for k in chaos.kills)} node(s); "
        f"killed bodies {len(killed_by)}",
        f"completed once {completed_once}, in DLQ {len(in_dlq)}, duplicates "
        f"{len(duplicates)}, lost {len(lost)}, overlaps {len(overlaps)} (detector) / "
        f"{len(interval_overlaps)} (intervals)",
        f"events: {dict(sorted(events.items()))}",
    ]
    lines += [
        f"recovery after {r['kind']} kill ({r['node']}): "
        + (f"{r['recovery_s']:.2f} s" if r["recovery_s"] is not None else "not restarted")
        + (
            f" (delivered again after {r['redelivered_s']:.2f} s)"
            if r["redelivered_s"] is not None
            else ""
        )
        + f" -> {r['outcome']}"
        for r in recoveries
    ]
    lines += evidence
    print("\n".join(lines))
    chaos_summary["random kills"] = {
        "lines": lines,
        "seed": seed,
        "tasks": TASKS,
        "keys": KEYS,
        "visibility_timeout_s": VISIBILITY_TIMEOUT,
        "run_seconds": round(run_seconds, 1),
        "kills": [{**k, "at": round(k["at"], 3)} for k in chaos.kills],
        "recoveries": recoveries,
        "completed_once": completed_once,
        "dlq": in_dlq,
        "duplicates": duplicates,
        "lost": lost,
        "overlaps_detector": overlaps,
        "overlaps_intervals": interval_overlaps,
        "events": dict(events),
    }

    # -- the guarantees ----------------------------------------------------
    problems = sorted({*duplicates, *missing})[:6]

    def report() -> str:
        return "\n".join([*evidence, chaos.report(), cluster.report(*problems, lines=30)])

    assert len(chaos.kills) == CHILD_KILLS + NODE_KILLS, report()
    assert duplicates == [], f"tasks completed more than once: {duplicates}\n{report()}"
    assert lost == [], f"tasks neither completed nor dead-lettered: {lost}\n{report()}"
    assert wrong == [], "\n".join(wrong) + "\n" + report()
    assert unexplained == [], f"bodies that neither ended nor were killed: {unexplained}"
    assert overlaps == [], f"the overlap detector saw bodies overlap: {overlaps}\n{report()}"
    assert interval_overlaps == [], f"body intervals overlap: {interval_overlaps}\n{report()}"
    assert token_disorder == [], f"fencing tokens out of order: {token_disorder}"
    assert all(r["recovery_s"] is not None for r in recoveries if r["outcome"] == "completed"), (
        f"a killed task completed without starting again after its kill: {recoveries}"
    )
