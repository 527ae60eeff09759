"""The fault suite's own database + vhost (devtools.services.Throwaway) with the faults it injects on
the services, and the supervisor that restarts the processes it kills."""

from __future__ import annotations

import logging
import threading
import time

import psycopg2

from devtools.rabbit_cluster import RABBITMQCTL, Cluster
from devtools.services import Proc, Throwaway, with_vhost

log = logging.getLogger(__name__)

#: application_name prefix of the worker processes' pooled connections (db.init_db's default)
WORKER_APP_PREFIX = "campaign-engine:"
#: worker connections that just committed a part `sending` (they are in the HTTP call now): their
#: last statement was one of the three that claim a part (prepared statements, campaign.db.prepared:
#: the send step's claim, label send_claim; its claim that records the part before, send_next_claim;
#: the generate delivery's record claiming the first part, text_parts_and_claim) AND a part is
#: `sending` under an attempt id that statement carried (each also runs for a message it then does
#: not claim: a check, a connectionState poll), or the text mark
_MID_SEND_SQL = r"""
SELECT a.application_name FROM pg_stat_activity a
 WHERE a.datname = %s AND a.application_name LIKE %s AND a.state = 'idle'
   AND (a.query ILIKE '%%UPDATE message_parts SET status = ''sending''%%'
        OR ((a.query LIKE 'EXECUTE ce\_send\_claim\_%%' OR a.query LIKE 'EXECUTE ce\_send\_next\_claim\_%%'
             OR a.query LIKE 'EXECUTE ce\_text\_parts\_and\_claim\_%%')
            AND EXISTS (
              SELECT 1 FROM message_parts p
               WHERE p.status = 'sending'
                 AND p.attempt_id::text IN (
                     SELECT (regexp_matches(a.query, '[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}',
                                            'g'))[1]))))"""
ADMIN_APP_NAME = "campaign-chaos-admin"


class Services(Throwaway):
    """This run's own PostgreSQL database and RabbitMQ vhost (same name), and the faults on them."""

    def __init__(self, name: str) -> None:
        super().__init__(name=name)
        self._probe: psycopg2.extensions.connection | None = None

    def admin(self, application_name: str | None = ADMIN_APP_NAME) -> psycopg2.extensions.connection:
        """A fresh autocommit connection to the admin database (never one of the engine's)."""
        return super().admin(application_name)

    def drop(self) -> None:
        """Drop the database and delete the vhost; what is left behind is only logged."""
        self.close()
        try:
            super().drop()
        except RuntimeError as exc:
            log.warning("%s", exc)

    # -- faults on the services ---------------------------------------------------------------

    def restart_rabbitmq(self, outage_s: float) -> dict[str, float]:
        """``rabbitmqctl stop_app``, wait ``outage_s``, ``start_app``; returns the moments (epoch s)."""
        t0 = time.time()
        try:
            self.ctl("stop_app", timeout=30)
            stopped = time.time()
            time.sleep(outage_s)
        finally:
            # whatever happened, RabbitMQ must come back: other runs share it
            self.ctl("start_app", timeout=60)
        started = time.time()
        log.warning(
            "RabbitMQ restarted: stop_app at +0.0 s, down %.1f s, start_app done after %.1f s",
            started - stopped,
            started - t0,
        )
        return {"t": t0, "stopped": stopped, "started": started}

    def terminate_worker_backends(self) -> int:
        """``pg_terminate_backend`` every worker connection of THIS run's database (never our own)."""
        conn = self.admin()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    """SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity
                               WHERE datname = %s AND pid <> pg_backend_pid() AND application_name LIKE %s""",
                    (self.name, WORKER_APP_PREFIX + "%"),
                )
                return int(cur.fetchone()[0])
        finally:
            conn.close()

    def mid_send_worker_pids(self) -> set[int]:
        """Pids of worker processes whose connection last claimed a part ``sending`` (so: in the HTTP call).

        Polled every few ms by the injector: one kept connection, not a new one per call.
        """
        for attempt in range(2):
            try:
                if self._probe is None or self._probe.closed:
                    # on the run's own database (pg_stat_activity is the cluster's; the parts are here)
                    self._probe = psycopg2.connect(self.database_url, application_name=ADMIN_APP_NAME)
                    self._probe.autocommit = True
                with self._probe.cursor() as cur:
                    cur.execute(_MID_SEND_SQL, (self.name, WORKER_APP_PREFIX + "%"))
                    rows = cur.fetchall()
                break
            except psycopg2.Error:
                if self._probe is not None:
                    self._probe.close()
                self._probe = None
                if attempt:
                    raise
        pids = set()
        for (app,) in rows:
            try:
                pids.add(int(app.split(":", 1)[1]))
            except (IndexError, ValueError):
                continue
        return pids

    def close(self) -> None:
        """Close the polling connection."""
        if self._probe is not None:
            self._probe.close()
            self._probe = None


class ClusterServices(Services):
    """The same run on a local 3-node RabbitMQ cluster (``--cluster``, T-REL-3 at the suite's scale):
    the vhost is made on the cluster, the engine's RABBITMQ_URL names the three nodes, and the
    "RabbitMQ restart" fault kills -9 the first node (the one every process is connected to) and
    starts it again after the outage, instead of stop_app/start_app of the machine's node."""

    def __init__(self, name: str, cluster: Cluster) -> None:
        self.cluster = cluster
        super().__init__(name)
        self.rabbit_base_url = cluster.nodes[0].url()
        self.rabbitmqctl = [RABBITMQCTL, "-n", cluster.nodes[0].name]

    @property
    def rabbitmq_url(self) -> str:
        return ";".join(with_vhost(node.url(), self.name) for node in self.cluster.nodes)

    def restart_rabbitmq(self, outage_s: float) -> dict[str, float]:
        victim = self.cluster.nodes[0]
        t0 = time.time()
        try:
            self.cluster.kill_node(victim)
            stopped = time.time()
            time.sleep(outage_s)
        finally:
            self.cluster.start_node(victim)
            self.cluster.await_node(victim)
        started = time.time()
        log.warning("RabbitMQ node %s killed (SIGKILL), back after %.1f s", victim.name, started - stopped)
        return {"t": t0, "stopped": stopped, "started": started}


class Supervisor:
    """Restarts any supervised process that died (what systemd/compose would do in production)."""

    def __init__(self, procs: list[Proc], restart_delay: float = 1.0) -> None:
        self.procs = procs
        self.restart_delay = restart_delay
        self.restarts: list[tuple[str, float]] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="chaos-supervisor", daemon=True)

    def start(self) -> None:
        """Start every process and the watch loop."""
        for p in self.procs:
            p.start()
        self._thread.start()

    def _loop(self) -> None:
        dead_since: dict[str, float] = {}
        while not self._stop.wait(0.2):
            with self._lock:
                for p in self.procs:
                    if p.popen is None or p.alive or p.expected_exit:
                        continue
                    # restart after a short pause (as a process manager would), without holding
                    # the lock meanwhile: the injector may want to kill another one
                    if p.name not in dead_since:
                        dead_since[p.name] = time.time()
                        log.warning(
                            "%s exited (code %s): restarting in %.1f s", p.name, p.popen.returncode, self.restart_delay
                        )
                        continue
                    if time.time() - dead_since[p.name] < self.restart_delay:
                        continue
                    del dead_since[p.name]
                    p.start()
                    self.restarts.append((p.name, time.time()))

    def kill9(self, proc: Proc) -> None:
        """Kill a supervised process; the loop restarts it."""
        with self._lock:
            proc.kill9()

    def stop(self) -> None:
        """Stop the loop, then every process."""
        self._stop.set()
        self._thread.join(5)
        with self._lock:
            for p in self.procs:
                p.stop(20)
