"""Spooled events leave only under the key that tracked them (issue #18), and a
spool that cannot be trusted, or a row that cannot be sent, is handled.

Real clients, a real collector, real ``produl-server drain`` runs, and for
the fleet a real redis-server.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from produl_server import ConfigurationError, Produl
from produl_server._spool import FILENAME
from produl_server.testing import LocalCollector

KEY_A = "sk_site_a_0000000000000000"
KEY_B = "sk_site_b_1111111111111111"


def spool_three(collector, key, **where):
    """Site A tracks 3 private events while the collector fails; they are spooled."""
    collector.fail_next(1_000_000, status=503)
    site = Produl(
        server_key=key,
        api_url=collector.url,
        shutdown_timeout=0.5,
        max_requests_per_minute=None,
        retry_initial_delay=0.02,
        retry_max_delay=0.05,
        **where,
    )
    for i in range(3):
        site.track_event("private", {"secret_plan": f"a-{i}"}, visitor_id=f"cus_a{i}")
    site.shutdown()
    assert site.stats.spooled == 3
    collector.reset()  # the collector is back


def run_drain(collector, key, *options, api_url=None):
    env = {
        "PRODUL_SERVER_KEY": key,
        "PRODUL_API_URL": api_url or collector.url,
        "PYTHONPATH": ":".join(sys.path),
        "PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin",
        # The test's own default spool (conftest), never the real home.
        "XDG_STATE_HOME": os.environ["XDG_STATE_HOME"],
    }
    return subprocess.run(
        [sys.executable, "-m", "produl_server", "drain", *options, "--timeout", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )


def bodies_sent_with(collector, key):
    return [r.body for r in collector.requests if r.headers.get("X-Produl-Server-Key") == key]


def test_another_sites_client_never_sends_the_spooled_events_of_a_site(tmp_path):
    spool = str(tmp_path / "spool")
    with LocalCollector(server_key=KEY_A) as collector:
        spool_three(collector, KEY_A, spool_dir=spool)
        # Site B: same default-like api_url, same spool directory, its own key.
        site_b = Produl(
            server_key=KEY_B, api_url=collector.url, spool_dir=spool, max_requests_per_minute=None
        )
        site_b.track_event("b_only", visitor_id="cus_b")
        site_b.flush(timeout=10)
        site_b.shutdown(timeout=5)
        sent_by_b = bodies_sent_with(collector, KEY_B)
        assert [json.loads(body)["n"] for body in sent_by_b] == ["b_only"]
        # B's drain leaves A's events alone and says so.
        drained = run_drain(collector, KEY_B, "--spool", spool)
        assert drained.returncode == 0, drained.stderr
        assert "3 event(s) of other API URLs or keys left untouched" in drained.stdout
        assert [json.loads(b)["n"] for b in bodies_sent_with(collector, KEY_B)] == ["b_only"]
        # A's own drain delivers them, under A's key.
        drained = run_drain(collector, KEY_A, "--spool", spool)
        assert drained.returncode == 0, drained.stderr
        assert "delivered 3 spooled event(s)" in drained.stdout
        assert "the spool is empty" in drained.stdout
        plans = sorted(
            json.loads(b)["pr"]["secret_plan"] for b in bodies_sent_with(collector, KEY_A)
        )
        assert plans == ["a-0", "a-1", "a-2"]
        assert KEY_A not in drained.stdout + drained.stderr


def test_drain_for_another_api_url_says_what_it_left_and_refuses_a_missing_spool(tmp_path):
    spool = str(tmp_path / "spool")
    with LocalCollector(server_key=KEY_A) as collector:
        spool_three(collector, KEY_A, spool_dir=spool)
        other = run_drain(collector, KEY_A, "--spool", spool, api_url="http://127.0.0.1:9")
        assert other.returncode == 0, other.stderr
        assert "the spool is empty" not in other.stdout
        assert "3 event(s) of other API URLs or keys left untouched" in other.stdout
        typo = run_drain(collector, KEY_A, "--spool", spool + "-typo")
        assert typo.returncode == 2
        assert "no spool at" in typo.stderr
        assert "no such directory" in typo.stderr
        assert not os.path.exists(spool + "-typo")  # nothing created at the typo
        empty_dir = tmp_path / "empty"
        empty_dir.mkdir()
        assert run_drain(collector, KEY_A, "--spool", str(empty_dir)).returncode == 2


def test_a_bad_row_goes_to_the_quarantine_and_the_good_ones_are_sent(tmp_path):
    spool = tmp_path / "spool"
    with LocalCollector(server_key=KEY_A) as collector:
        spool_three(collector, KEY_A, spool_dir=str(spool))
        db = sqlite3.connect(spool / FILENAME)
        with db:
            # A body stored as TEXT, between the valid rows (by id order).
            db.execute(
                "UPDATE events SET body = CAST(body AS TEXT)"
                " WHERE id = (SELECT min(id) + 1 FROM events)"
            )
        db.close()
        drained = run_drain(collector, KEY_A, "--spool", str(spool))
        assert drained.returncode == 0, drained.stderr
        assert "delivered 2 spooled event(s)" in drained.stdout
        assert "1 event(s) in quarantine" in drained.stdout
        assert len(collector.events) == 2
        db = sqlite3.connect(spool / FILENAME)
        reasons = [row[0] for row in db.execute("SELECT reason FROM quarantine")]
        db.close()
        assert reasons == ["its body is str, not bytes (BLOB)"]


def test_a_client_reports_quarantined_rows_in_stats(tmp_path):
    spool = tmp_path / "spool"
    with LocalCollector(server_key=KEY_A) as collector:
        spool_three(collector, KEY_A, spool_dir=str(spool))
        db = sqlite3.connect(spool / FILENAME)
        with db:
            db.execute("UPDATE events SET visitor = x'ff' WHERE id = (SELECT min(id) FROM events)")
        db.close()
        client = Produl(server_key=KEY_A, api_url=collector.url, spool_dir=str(spool))
        collector.wait_for(2, timeout=20)
        client.shutdown(timeout=5)
        assert client.stats.quarantined == 1


@pytest.mark.parametrize("mode", [0o777, 0o770])
def test_a_spool_directory_others_may_write_is_refused(tmp_path, mode):
    shared = tmp_path / "shared-spool"
    shared.mkdir()
    shared.chmod(mode)
    with pytest.raises(ConfigurationError) as caught:
        Produl(server_key=KEY_A, api_url="http://127.0.0.1:9", spool_dir=str(shared))
    assert "writable by group or others" in str(caught.value)
    assert not (shared / FILENAME).exists()


def test_a_planted_spool_file_others_may_write_is_refused(tmp_path):
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o700)
    planted = directory / FILENAME
    planted.write_bytes(b"")
    planted.chmod(0o666)
    with pytest.raises(ConfigurationError) as caught:
        Produl(server_key=KEY_A, api_url="http://127.0.0.1:9", spool_dir=str(directory))
    assert "writable by group or others" in str(caught.value)


def test_a_spool_file_others_may_read_is_made_private(tmp_path):
    directory = tmp_path / "spool"
    directory.mkdir(mode=0o700)
    Produl(server_key=KEY_A, api_url="http://127.0.0.1:9", spool_dir=str(directory)).shutdown(0)
    (directory / FILENAME).chmod(0o644)
    Produl(server_key=KEY_A, api_url="http://127.0.0.1:9", spool_dir=str(directory)).shutdown(0)
    assert (directory / FILENAME).stat().st_mode & 0o777 == 0o600


def test_rows_spooled_before_owners_existed_are_sent_only_when_adopted(tmp_path):
    spool = tmp_path / "spool"
    with LocalCollector(server_key=KEY_A) as collector:
        spool_three(collector, KEY_A, spool_dir=str(spool))
        db = sqlite3.connect(spool / FILENAME)
        with db:
            db.execute("UPDATE events SET owner = NULL")  # as schema 1 left them
        db.close()
        plain = run_drain(collector, KEY_A, "--spool", str(spool))
        assert plain.returncode == 0, plain.stderr
        assert "3 event(s) spooled before events carried their key's fingerprint" in plain.stdout
        assert collector.events == []
        adopted = run_drain(collector, KEY_A, "--spool", str(spool), "--adopt-unowned")
        assert adopted.returncode == 0, adopted.stderr
        assert "delivered 3 spooled event(s)" in adopted.stdout
        assert len(collector.events) == 3


def test_a_full_queue_never_waits_on_a_spool_another_process_holds(tmp_path):
    import time

    spool = tmp_path / "spool"
    with LocalCollector(server_key=KEY_A) as collector:
        collector.hang()
        client = Produl(
            server_key=KEY_A,
            api_url=collector.url,
            spool_dir=str(spool),
            max_queue_size=5,
            shutdown_timeout=0.5,
        )
        holder = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sqlite3, sys, time\n"
                f"db = sqlite3.connect({str(spool / FILENAME)!r}, isolation_level=None)\n"
                "db.execute('BEGIN IMMEDIATE')\n"
                "print('held', flush=True)\n"
                "sys.stdin.read()\n",
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        try:
            assert holder.stdout.readline().strip() == "held"
            started = time.monotonic()
            for i in range(20):
                client.track_event("e", {"i": i}, visitor_id=f"v{i}")
            elapsed = time.monotonic() - started
        finally:
            holder.stdin.close()
            holder.wait(10)
            holder.stdout.close()
        # Waiting on the busy spool costs its 2 s timeout per call (28 s in
        # all before issue #18); the calls only hand the events over, so all
        # twenty end before even one such wait would have.
        assert elapsed < 2.0
        collector.release()
        client.shutdown(timeout=10)
        stats = client.stats
        assert stats.queued == 20
        assert stats.sent + stats.spooled + sum(stats.dropped.values()) == 20
