"""The foundation against real servers: Kafka (KRaft), Redis and Triton of the isolated
test stack, and the ``ctrstream stack`` CLI driving stacks of its own."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from ctrstream.config import Topic
from ctrstream.stack.manager import isolated_settings, settings_env
from ctrstream.stack.services import pid_alive, port_in_use, wait_until

CTRSTREAM = str(Path(sys.executable).parent / "ctrstream")


# ----------------------------------------------------------------------------------- Kafka


def test_kafka_round_trip_with_a_two_member_group(settings, unique):
    from confluent_kafka import TIMESTAMP_CREATE_TIME, KafkaError

    from ctrstream.kafka.clients import (
        ensure_topics,
        make_consumer,
        make_producer,
        topic_end_offsets,
    )

    n, partitions = 10_000, 6
    topic = f"roundtrip-{unique}"
    assert ensure_topics(settings, [Topic(name=topic, partitions=partitions)]) == [topic]
    group = f"roundtrip-{unique}"

    # two members of one group, each polling in its own thread
    stop = threading.Event()
    lock = threading.Lock()
    received: list[dict[int, tuple]] = [{}, {}]  # member -> seq -> (partition, key, headers, ts)
    duplicates: list[int] = []
    assigned: list[set[int]] = [set(), set()]
    seen_partitions: list[set[int]] = [set(), set()]
    errors: list[str] = []
    last_offset: dict[int, int] = {}  # partition -> last offset consumed
    consumers = [make_consumer(settings, group) for _ in range(2)]

    def member(i: int) -> None:
        c = consumers[i]

        def on_assign(consumer, parts):
            with lock:
                assigned[i] = {p.partition for p in parts}

        def on_revoke(consumer, parts):
            with lock:
                assigned[i] = set()

        c.subscribe([topic], on_assign=on_assign, on_revoke=on_revoke)
        while not stop.is_set():
            for msg in c.consume(num_messages=1000, timeout=0.1):
                if msg.error():
                    if msg.error().code() != KafkaError._PARTITION_EOF:
                        errors.append(str(msg.error()))
                    continue
                headers = dict(msg.headers() or [])
                seq = int(headers["seq"])
                with lock:
                    if any(seq in r for r in received):
                        duplicates.append(seq)
                    received[i][seq] = (msg.partition(), msg.key(), headers, msg.timestamp())
                    seen_partitions[i].add(msg.partition())
                    last_offset[msg.partition()] = max(
                        last_offset.get(msg.partition(), -1), msg.offset()
                    )

    threads = [threading.Thread(target=member, args=(i,), daemon=True) for i in range(2)]
    for t in threads:
        t.start()
    try:
        # produce only once the group is stable: both members hold disjoint partitions that
        # cover the topic (a rebalance mid-way would re-deliver uncommitted records)
        def stable():
            with lock:
                a, b = assigned
                return a and b and not (a & b) and (a | b) == set(range(partitions))

        wait_until(stable, 60, what="both group members to be assigned partitions")

        base_ts = int(time.time() * 1000) - 3_600_000
        producer = make_producer(settings)
        delivery_errors: list[str] = []

        def on_delivery(err, msg):
            if err is not None:
                delivery_errors.append(str(err))

        for seq in range(n):
            producer.produce(
                topic,
                key=f"user-{seq % 997}".encode(),
                value=f"value-{seq}".encode(),
                headers=[("seq", str(seq).encode()), ("source", b"test_stack")],
                timestamp=base_ts + seq,
                on_delivery=on_delivery,
            )
            if seq % 1000 == 0:
                producer.poll(0)
        assert producer.flush(30) == 0, "producer did not deliver everything within 30s"
        assert not delivery_errors, delivery_errors[:5]
        ends = topic_end_offsets(settings, topic)
        assert sum(ends.values()) == n

        wait_until(
            lambda: sum(len(r) for r in received) >= n, 60, what=f"{n} records to be consumed"
        )

        # every partition was read to its end, so nothing more can arrive (the members'
        # own bookkeeping: a Consumer is not called from another thread while it polls)
        def at_end():
            with lock:
                return {p: o + 1 for p, o in last_offset.items()} == ends

        wait_until(at_end, 30, what="both members to reach the end of their partitions")
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        for c in consumers:
            c.close()

    assert not errors, errors[:5]
    assert not duplicates, f"{len(duplicates)} records arrived twice, e.g. {duplicates[:5]}"
    merged = {**received[0], **received[1]}
    assert sorted(merged) == list(range(n)), "some records never arrived"
    for seq, (_partition, key, headers, (ts_type, ts)) in merged.items():
        assert key == f"user-{seq % 997}".encode()
        assert headers == {"seq": str(seq).encode(), "source": b"test_stack"}
        assert ts_type == TIMESTAMP_CREATE_TIME and ts == base_ts + seq
    # the same key always lands in the same partition
    by_key: dict[bytes, set[int]] = {}
    for partition, key, _, _ in merged.values():
        by_key.setdefault(key, set()).add(partition)
    assert all(len(p) == 1 for p in by_key.values())
    assert received[0] and received[1], "one member of the group received nothing"
    assert seen_partitions[0] and seen_partitions[1]
    assert not (seen_partitions[0] & seen_partitions[1]), "a partition was read by both members"
    print(
        f"\nkafka: {n} records over {partitions} partitions; member 0 read partitions "
        f"{sorted(seen_partitions[0])} ({len(received[0])} records), member 1 "
        f"{sorted(seen_partitions[1])} ({len(received[1])} records)"
    )


# ----------------------------------------------------------------------------------- Redis


def test_redis_round_trip(settings, unique):
    import redis

    r = redis.Redis.from_url(settings.redis.url)
    prefix = f"test:{unique}"
    try:
        with r.pipeline(transaction=False) as p:
            for i in range(1000):
                p.set(f"{prefix}:k{i}", i * i)
            assert all(p.execute())
        with r.pipeline(transaction=False) as p:
            for i in range(1000):
                p.get(f"{prefix}:k{i}")
            values = p.execute()
        assert [int(v) for v in values] == [i * i for i in range(1000)]

        h = f"{prefix}:hash"
        assert r.hset(h, mapping={"clicks": 3, "impressions": 120, "ctr": "0.025"}) == 3
        r.hincrby(h, "clicks", 2)
        assert r.hgetall(h) == {b"clicks": b"5", b"impressions": b"120", b"ctr": b"0.025"}

        r.set(f"{prefix}:ttl", "x", ex=300)
        assert 0 < r.ttl(f"{prefix}:ttl") <= 300
        assert r.ttl(f"{prefix}:k0") == -1  # no expiry
        r.set(f"{prefix}:short", "x", px=150)
        assert r.exists(f"{prefix}:short")
        wait_until(lambda: not r.exists(f"{prefix}:short"), 5, what="the key to expire")
    finally:
        keys = list(r.scan_iter(f"{prefix}:*", count=1000))
        if keys:
            r.delete(*keys)
        r.close()


# ---------------------------------------------------------------------------------- Triton

MODEL_PY = '''\
import os, site
for p in filter(None, os.environ.get("CTRSTREAM_TRITON_SITE", "").split(os.pathsep)):
    site.addsitedir(p)
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    """y = 2x + 1"""

    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            y = (2.0 * x + 1.0).astype(np.float32)
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", y)]))
        return responses
'''


def test_triton_model_control_and_grpc_inference(settings, unique):
    import tritonclient.grpc as grpcclient

    from ctrstream.models.publish import control_client

    name = f"affine_{unique}"
    model_dir = settings.triton.model_repository / name
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "config.pbtxt").write_text(
        textwrap.dedent(f"""\
        name: "{name}"
        backend: "python"
        max_batch_size: 64
        input [ {{ name: "x", data_type: TYPE_FP32, dims: [ 4 ] }} ]
        output [ {{ name: "y", data_type: TYPE_FP32, dims: [ 4 ] }} ]
        instance_group [ {{ kind: KIND_CPU, count: 1 }} ]
        """)
    )
    (model_dir / "1" / "model.py").write_text(MODEL_PY)

    client = control_client(settings)  # model control needs the stack's key
    try:
        assert client.is_server_live()
        assert not client.is_model_ready(name)  # explicit mode: nothing loads by itself
        t0 = time.monotonic()
        client.load_model(name)
        print(f"\ntriton: loaded Python-backend model {name} in {time.monotonic() - t0:.2f}s")
        assert client.is_model_ready(name)
        meta = client.get_model_metadata(name, as_json=True)
        assert meta["inputs"][0]["datatype"] == "FP32" and meta["inputs"][0]["shape"] == ["-1", "4"]

        x = np.arange(12, dtype=np.float32).reshape(3, 4) - 5.5
        inp = grpcclient.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        result = client.infer(name, [inp], outputs=[grpcclient.InferRequestedOutput("y")])
        y = result.as_numpy("y")
        assert y.dtype == np.float32 and y.shape == (3, 4)
        np.testing.assert_allclose(y, 2 * x + 1)

        client.unload_model(name)
        assert not client.is_model_ready(name)

        def state():
            index = client.get_model_repository_index(as_json=True)["models"]
            return next(m for m in index if m["name"] == name).get("state")

        # unloading finishes in the background (the stub process exits)
        wait_until(lambda: state() == "UNAVAILABLE", 30, what=f"{name} to finish unloading")
        with pytest.raises(Exception, match="(?i)unknown model|no available versions"):
            client.infer(name, [inp])
    finally:
        try:
            client.unload_model(name)
        except Exception:  # noqa: BLE001 - already unloaded
            pass
        client.close()


# ------------------------------------------------------------------------- stack CLI


def _cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CTRSTREAM, *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _cli_env(settings) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CTRSTREAM_")}
    env.update(settings_env(settings))
    env["COLUMNS"] = "200"  # rich wraps long messages at the terminal width
    return env


def _service_ports(s) -> list[int]:
    return [
        s.kafka.port,
        s.kafka.controller_port,
        s.redis.port,
        s.triton.http_port,
        s.triton.grpc_port,
        s.triton.metrics_port,
        s.prometheus.port,
    ]


def _recorded_pids(run_dir: Path) -> dict[str, int]:
    return {p.stem: int(p.read_text()) for p in run_dir.glob("*.pid")}


def _kill_leftovers(pids) -> None:
    import signal

    for pid in pids:
        if pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


def test_stack_up_on_an_occupied_port_fails_clearly(tmp_path):
    s = isolated_settings(tmp_path / "run")
    env = _cli_env(s)
    held = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        # the last service's port: nothing may start before the conflict is found
        held.bind(("127.0.0.1", s.triton.grpc_port))
        held.listen(1)
        res = _cli(["stack", "up"], env, timeout=120)
    finally:
        held.close()
    out = res.stdout + res.stderr
    pids = _recorded_pids(s.run_dir) if s.run_dir.exists() else {}
    _kill_leftovers(pids.values())
    assert res.returncode != 0, out
    assert f"127.0.0.1:{s.triton.grpc_port}" in out and "already in use" in out, out
    assert "Stop that process" in out and "CTRSTREAM_" in out, out  # says what to do
    assert "Traceback" not in out, out
    assert not [p for p in pids.values() if pid_alive(p)], f"left running: {pids}"
    assert not pids, f"PID files written although nothing should have started: {pids}"
    busy = [p for p in _service_ports(s) if port_in_use("127.0.0.1", p)]
    assert not busy, f"ports still bound after the failed start: {busy}"


def test_stack_cli_up_status_down(tmp_path):
    s = isolated_settings(tmp_path / "run")
    env = _cli_env(s)
    recorded: dict[str, int] = {}
    try:
        res = _cli(["stack", "up"], env)
        assert res.returncode == 0, res.stdout + res.stderr
        times = {
            m[0]: float(m[1]) for m in re.findall(r"^(\w+)\s+ready in ([\d.]+)s", res.stdout, re.M)
        }
        assert set(times) == {"kafka", "redis", "triton", "prometheus"}, res.stdout
        print(
            "\nstart-up seconds (ctrstream stack up, fresh run dir): "
            + ", ".join(f"{k} {v:.1f}s" for k, v in times.items())
        )
        recorded = _recorded_pids(s.run_dir)
        assert set(recorded) == {"kafka", "redis", "triton", "prometheus"}
        assert all(pid_alive(p) for p in recorded.values())

        status = _cli(["stack", "status"], env, timeout=60)
        assert status.returncode == 0, status.stdout + status.stderr
        for name, pid in recorded.items():
            assert re.search(rf"{name}\s.*{pid}.*ready", status.stdout), status.stdout

        again = _cli(["stack", "up"], env)  # harmless: nothing restarts, topics stay
        assert again.returncode == 0, again.stdout + again.stderr
        assert again.stdout.count("already running") == 4, again.stdout
        assert "topics created" not in again.stdout
        assert _recorded_pids(s.run_dir) == recorded

        down = _cli(["stack", "down"], env, timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert down.stdout.count("stopped") == 4, down.stdout
        alive = {n: p for n, p in recorded.items() if pid_alive(p)}
        assert not alive, f"still running after `stack down`: {alive}"
        assert not list(s.run_dir.glob("*.pid"))
        busy = [p for p in _service_ports(s) if port_in_use("127.0.0.1", p)]
        assert not busy, f"ports still bound after `stack down`: {busy}"

        status = _cli(["stack", "status"], env, timeout=60)
        assert status.returncode == 1, status.stdout + status.stderr
        assert status.stdout.count("down") >= 4, status.stdout
    finally:
        if any(pid_alive(p) for p in recorded.values()):
            _cli(["stack", "down"], env, timeout=120)
            _kill_leftovers(recorded.values())


def test_isolated_stack_starts_again_on_other_ports_when_one_is_taken(tmp_path, monkeypatch):
    """The test suite's stack picks free ports; one can be taken before its service binds
    it. The stack is then started again on other free ports instead of failing the session
    (a user's `ctrstream stack up` on a taken port still fails, with a clear message)."""
    import ctrstream.stack.manager as manager
    from ctrstream.stack.services import free_port

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        picks = iter([port])  # the first port picked is the taken one
        monkeypatch.setattr(manager, "free_port", lambda: next(picks, None) or free_port())
        log: list[str] = []
        with manager.isolated_stack(tmp_path / "stack", log=log.append) as stack:
            assert all(r.healthy for r in stack.status())
            assert port not in (stack.settings.kafka.port, stack.settings.kafka.controller_port)
    assert any("already in use" in m and "other free ports" in m for m in log), log
