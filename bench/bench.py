#!/usr/bin/env python3
"""koan-backup against pg_dump and COPY | zstd, on the local PostgreSQL and RabbitMQ.

Called by bench/run.sh (which builds the release binary first). Everything it
creates is scratch and removed at the end, also on Ctrl-C or SIGTERM: one
vhost, the databases koan_bench_<pid>*, and the work directory under
bench/out/ (logs are kept there with --keep).

Steps, each timed on its own with the machine's load average noted:

1. source: a Koan-layout table "Order" ("Id" text primary key, "Json" jsonb)
   with --rows orders of ~330 bytes (bench/orders.sql), vacuumed and read
   once (warm cache) before anything is timed;
2. --runs rounds of three backups, in an order that rotates each round:
   `pg_dump -Fc -t "Order"`, `psql -c 'COPY (SELECT "Id","Json" ...) TO STDOUT' | zstd -1`,
   and a koan-backup backup (coordinator + --workers workers, started beforehand
   and not timed; timed from submit to `completed`: `backup --plan --follow`);
3. in each round, the two restores into empty databases, alternating which goes
   first: `pg_restore` of that round's dump, and a koan-backup `replace` restore
   of that round's backup by --workers fresh workers whose source is the target;
4. tiny chunks: --tiny-chunks chunks of 10 rows (plan chunk_rows = 10) over a
   table of 10 x that many rows; chunks/s = chunks / wall seconds;
5. worker peak RSS (VmHWM) of a backup of each --rss-rows table size.

Peak RSS of koan processes: VmHWM from /proc/<pid>/status, read just before the
process is stopped (workers are started fresh for each timed koan step, the
coordinator lives for the whole session). CPU seconds of koan processes: utime
+ stime from /proc/<pid>/stat at the same moment. Client tools: wait4 rusage.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PG = ["-h", "127.0.0.1", "-p", "5432", "-U", "postgres"]
PG_URL = "postgresql://postgres@127.0.0.1:5432/"
MB = 1_000_000
MIB = 1024 * 1024
CLK_TCK = os.sysconf("SC_CLK_TCK")

TARGETS = {
    "backup_vs_pg_dump": 0.75,
    "backup_vs_copy_zstd": 1.25,
    "restore_vs_pg_restore": 1.0,
    "worker_peak_rss_mib": 100.0,
    "worker_rss_growth": 0.20,
    "tiny_chunks_per_s": 1000.0,
}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_snapshot() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, CPU seconds of the PostgreSQL cluster so far).

    The cluster's share: every `postgres` process's own time, plus the
    postmaster's reaped children (backends that already exited). Both include
    whatever else runs on this shared machine or cluster at the same time.
    """
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = (sum(fields[:8]) - fields[3] - fields[4]) / CLK_TCK
    pg = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pg += int(stat[11]) + int(stat[12])
        if stat[1] == "1" or (Path(f"/proc/{stat[1]}/comm").exists()
                              and Path(f"/proc/{stat[1]}/comm").read_text().strip() != "postgres"):
            pg += int(stat[13]) + int(stat[14])  # the postmaster: exited backends
    return busy, pg / CLK_TCK


class Perf:
    """`perf record -a` (whole machine) while one step runs; flat reports next to the logs."""

    def __init__(self, path: Path):
        self.path = path
        self.process = subprocess.Popen(["perf", "record", "-a", "-F", "499", "-o", str(path)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.5)

    def stop(self, pids: list[int]) -> None:
        self.process.send_signal(signal.SIGINT)
        self.process.wait()
        reports = {
            "by-command": ["--sort", "comm"],
            "workers": ["--pid", ",".join(map(str, pids)), "--sort", "dso,sym"],
            "postgres": ["--comm", "postgres", "--sort", "dso,sym"],
        }
        for name, extra in reports.items():
            out = subprocess.run(["perf", "report", "-i", str(self.path), "--no-children", "--stdio",
                                  "--percentage", "relative", "--percent-limit", "0.5", *extra], capture_output=True, text=True).stdout
            self.path.with_suffix(f".{name}.txt").write_text(out)


def psql(db: str, *sql: str, quiet: bool = True) -> str:
    command = ["psql", *PG, "-v", "ON_ERROR_STOP=1", "-qAt", db]
    for statement in sql:
        command += ["-c", statement]
    return subprocess.run(command, check=True, capture_output=quiet, text=True).stdout or ""


def timed(command: list[str] | str, *, shell: bool = False, stdout=subprocess.DEVNULL, env=None) -> dict:
    """Runs one command to its end; wall seconds and the rusage of its process tree."""
    started_load = load()
    busy0, pg0 = cpu_snapshot()
    start = time.monotonic()
    if shell:
        command = ["bash", "-o", "pipefail", "-c", command]
    process = subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.monotonic() - start
    busy1, pg1 = cpu_snapshot()
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"{command} exited {process.returncode}: {stderr[-2000:]}")
    return {
        "wall_s": round(wall, 3),
        "client_cpu_s": round(usage.ru_utime + usage.ru_stime, 2),
        "client_peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
        "load_before": started_load,
        "machine_busy_cores": round((busy1 - busy0) / wall, 2),
        "pg_cluster_cpu_s": round(pg1 - pg0, 2),
        "stderr": stderr,
    }


class Proc:
    """A koan-backup process this bench started (and only those are ever signalled)."""

    def __init__(self, name: str, argv: list[str], env: dict, logdir: Path, ready: str):
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self.log = open(self.log_path, "ab")
        self.process = subprocess.Popen(argv, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.ready = ready

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.process.returncode}; see {self.log_path}")
            if self.ready.encode() in self.log_path.read_bytes():
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name} not ready after {timeout}s; see {self.log_path}")

    def stats(self) -> dict:
        """Peak RSS and CPU seconds so far, from /proc."""
        pid = self.process.pid
        hwm = rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                hwm = int(line.split()[1])
            elif line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK
        return {"peak_rss_mib": round(hwm / 1024, 1), "rss_mib": round(rss / 1024, 1), "cpu_s": round(cpu, 2)}

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


class Bench:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        built = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target")) / "release" / "koan-backup"
        self.source_bin = Path(os.environ.get("KOAN_BENCH_BIN", built))
        self.name = f"koan_bench_{os.getpid()}"
        self.stamp = dt.datetime.now().strftime("%Y%m%dT%H%M%S")
        self.work = ROOT / "bench" / "out" / f"{self.stamp}-{os.getpid()}"
        self.logs = self.work / "logs"
        self.storage = self.work / "archives"
        self.procs: list[Proc] = []
        self.databases: list[str] = []
        self.vhost_created = False
        self.coordinator: Proc | None = None
        self.env = dict(os.environ)
        self.env.update(
            KOAN_AMQP_URL=f"amqp://guest:guest@127.0.0.1:5672/{self.name}",
            KOAN_DATABASE_URL=PG_URL + self.name + "_state",
            KOAN_SOURCE_URL=PG_URL + self.name,
            KOAN_STORAGE_URL=str(self.storage),
            KOAN_CONCURRENCY=str(args.concurrency),
            RUST_LOG=os.environ.get("RUST_LOG", "info"),
        )
        self.results: dict = {}

    # ---- scratch resources -------------------------------------------------

    def create_db(self, name: str) -> None:
        psql("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}"')
        if name not in self.databases:
            self.databases.append(name)

    def drop_db(self, name: str) -> None:
        psql("postgres", f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self.databases:
            self.databases.remove(name)

    def setup(self) -> None:
        self.logs.mkdir(parents=True)
        self.storage.mkdir()
        # A copy, so a rebuild during the session cannot change what is measured.
        self.bin = str(self.work / "koan-backup")
        shutil.copy2(self.source_bin, self.bin)
        subprocess.run(["rabbitmqctl", "-q", "add_vhost", self.name], check=True, capture_output=True)
        self.vhost_created = True
        subprocess.run(["rabbitmqctl", "-q", "set_permissions", "-p", self.name, "guest", ".*", ".*", ".*"],
                       check=True, capture_output=True)
        self.create_db(self.name)
        self.create_db(self.name + "_state")

    def cleanup(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as error:  # keep cleaning
                log(f"stopping {proc.name}: {error}")
        self.procs.clear()
        for db in list(self.databases):
            try:
                self.drop_db(db)
            except Exception as error:
                log(f"dropping {db}: {error}")
        if self.vhost_created:
            subprocess.run(["rabbitmqctl", "-q", "delete_vhost", self.name], capture_output=True)
        if self.args.keep:
            log(f"logs and archives kept in {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    # ---- processes -----------------------------------------------------------

    def start(self, name: str, argv: list[str], ready: str, env: dict | None = None) -> Proc:
        proc = Proc(name, [self.bin, *argv], env or self.env, self.logs, ready)
        self.procs.append(proc)
        return proc

    def stop(self, procs: list[Proc]) -> list[dict]:
        """Reads each process's VmHWM and CPU, then stops it."""
        stats = []
        for proc in procs:
            stats.append({"process": proc.name, **proc.stats()})
        for proc in procs:
            proc.stop()
            self.procs.remove(proc)
        return stats

    def start_workers(self, label: str, pool: str | None = None, source_url: str | None = None) -> list[Proc]:
        env = dict(self.env)
        if source_url:
            env["KOAN_SOURCE_URL"] = source_url
        argv = ["worker"] + (["--pool", pool] if pool else [])
        workers = [self.start(f"{label}-worker-{i}", argv, "consuming jobs", env)
                   for i in range(1, self.args.workers + 1)]
        for worker in workers:
            worker.wait_ready()
        time.sleep(0.5)
        return workers

    def wants_perf(self, label: str) -> bool:
        """With --perf: the first round's backup and restore, and the tiny chunks."""
        return self.args.perf and label in ("r1-backup", "r1-restore", "tiny")

    # ---- steps -------------------------------------------------------------------

    def fill(self, table: str, rows: int) -> dict:
        log(f'creating "{table}" with {rows:,} rows')
        start = time.monotonic()
        subprocess.run(["psql", *PG, "-v", "ON_ERROR_STOP=1", "-qAt", "-v", f"table={table}", "-v", f"rows={rows}",
                        "-f", str(ROOT / "bench" / "orders.sql"), self.name], check=True)
        fill_s = time.monotonic() - start
        info = psql(self.name, f'SELECT count(*), avg(octet_length("Json"::text))::int, '
                                 f'pg_total_relation_size(\'"{table}"\') FROM "{table}"').split("|")
        # Reading the table once warms the cache, and measures the raw COPY text size.
        copy = subprocess.run(
            ["bash", "-o", "pipefail", "-c",
             f"psql -h 127.0.0.1 -U postgres -qAt -c 'COPY (SELECT \"Id\", \"Json\" FROM \"{table}\") TO STDOUT' "
             f"{self.name} | wc -c"], check=True, capture_output=True, text=True)
        return {"table": table, "rows": int(info[0]), "avg_doc_bytes": int(info[1]),
                "table_bytes": int(info[2]), "raw_copy_bytes": int(copy.stdout.strip()),
                "fill_s": round(fill_s, 1)}

    def plan(self, table: str, chunk_rows: int | None) -> Path:
        path = self.work / f"plan-{table}-{chunk_rows or 'default'}.toml"
        text = (f'plan_id = "bench:{table.lower()}"\n'
                f'description = "koan-backup benchmark"\n'
                f'consistency = "snapshot"\n\n'
                f'[[entities]]\nname = "orders"\ntable = "{table}"\nbucket = "bench"\nversion = "$.version"\n')
        if chunk_rows:
            text += f"chunk_rows = {chunk_rows}\n"
        path.write_text(text)
        return path

    def koan_backup(self, label: str, table: str, chunk_rows: int | None) -> dict:
        operation = str(uuid.uuid4())
        plan = self.plan(table, chunk_rows)
        workers = self.start_workers(label)
        perf = Perf(self.work / f"perf-{label}.data") if self.wants_perf(label) else None
        result = timed([self.bin, "backup", "--plan", str(plan), "--operation-id", operation, "--follow", "--json"],
                       stdout=open(self.logs / f"{label}-client.jsonl", "wb"), env=self.env)
        if perf:
            perf.stop([w.process.pid for w in workers])
        result["workers"] = self.stop(workers)
        result["coordinator"] = self.coordinator.stats() if self.coordinator else None
        result["operation_id"] = operation
        report = self.report(self.logs / f"{label}-client.jsonl")
        result["state"] = report.get("state")
        if report.get("state") != "completed":
            raise RuntimeError(f"backup {operation} ended {report.get('state')}: {report}")
        files = [p for p in self.storage.rglob("*") if p.is_file() and operation in str(p)]
        result["archive_bytes"] = sum(p.stat().st_size for p in files if p.name.endswith(".zst"))
        result["archive_files"] = len(files)
        return result

    @staticmethod
    def report(path: Path) -> dict:
        last = {}
        for line in path.read_text().splitlines():
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict) and "state" in value:
                last = value
        return last

    def koan_restore(self, label: str, backup_id: str, target_db: str) -> dict:
        self.create_db(target_db)
        workers = self.start_workers(label, pool="bench-restore", source_url=PG_URL + target_db)
        perf = Perf(self.work / f"perf-{label}.data") if self.wants_perf(label) else None
        result = timed([self.bin, "restore", backup_id, "--mode", "replace", "--pool", "bench-restore",
                        "--follow", "--json"],
                       stdout=open(self.logs / f"{label}-client.jsonl", "wb"), env=self.env)
        if perf:
            perf.stop([w.process.pid for w in workers])
        result["workers"] = self.stop(workers)
        result["coordinator"] = self.coordinator.stats() if self.coordinator else None
        report = self.report(self.logs / f"{label}-client.jsonl")
        result["state"] = report.get("state")
        if report.get("state") != "completed":
            raise RuntimeError(f"restore of {backup_id} ended {report.get('state')}: {report}")
        result["rows_restored"] = int(psql(target_db, 'SELECT count(*) FROM "Order"').strip())
        self.drop_db(target_db)
        return result

    def pg_dump(self, round_no: int) -> dict:
        path = self.work / f"dump-{round_no}.pgdump"
        result = timed(["pg_dump", *PG, "-Fc", "-t", '"Order"', "-f", str(path), self.name])
        result["archive_bytes"] = path.stat().st_size
        result["path"] = str(path)
        return result

    def copy_zstd(self, round_no: int) -> dict:
        path = self.work / f"copy-{round_no}.tsv.zst"
        result = timed(f"psql -h 127.0.0.1 -U postgres -qAt -c 'COPY (SELECT \"Id\", \"Json\" FROM \"Order\") TO STDOUT' "
                       f"{self.name} | zstd -1 -q -f -o {path}", shell=True)
        result["archive_bytes"] = path.stat().st_size
        path.unlink()
        return result

    def pg_restore(self, dump: str, target_db: str) -> dict:
        self.create_db(target_db)
        result = timed(["pg_restore", *PG, "--no-owner", "-d", target_db, dump])
        result["rows_restored"] = int(psql(target_db, 'SELECT count(*) FROM "Order"').strip())
        self.drop_db(target_db)
        return result

    # ---- the session -----------------------------------------------------------------

    def run(self) -> dict:
        args = self.args
        self.setup()
        self.results = {
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "machine": {"nproc": os.cpu_count(), "kernel": platform.release(),
                        "uptime_start": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
                        "postgres": psql("postgres", "SHOW server_version").strip(),
                        "git": subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                              capture_output=True, text=True).stdout.strip(),
                        "binary": str(self.source_bin)},
            "args": vars(args),
        }
        self.coordinator = self.start("coordinator", ["coordinator"], "coordinator connected")
        self.coordinator.wait_ready()

        if args.runs > 0:
            self.results["source"] = self.fill("Order", args.rows)
            self.main_rounds()
        if args.tiny_chunks > 0:
            self.tiny()
        for rows in args.rss_rows:
            self.rss_point(rows)
        self.results["coordinator"] = self.coordinator.stats()
        self.stop([self.coordinator])
        self.coordinator = None
        self.results["machine"]["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
        self.summarise()
        return self.results

    def main_rounds(self) -> None:
        args = self.args
        backups = {"pg_dump": [], "copy_zstd": [], "koan": []}
        restores = {"pg_restore": [], "koan_replace": []}
        orders = [["pg_dump", "copy_zstd", "koan"], ["koan", "pg_dump", "copy_zstd"], ["copy_zstd", "koan", "pg_dump"]]
        for round_no in range(1, args.runs + 1):
            order = orders[(round_no - 1) % len(orders)]
            dump = koan_id = None
            for tool in order:
                log(f"round {round_no}: backup with {tool} (load {load()})")
                if tool == "pg_dump":
                    result = self.pg_dump(round_no)
                    dump = result.pop("path")
                elif tool == "copy_zstd":
                    result = self.copy_zstd(round_no)
                else:
                    result = self.koan_backup(f"r{round_no}-backup", "Order", args.chunk_rows)
                    koan_id = result["operation_id"]
                result.pop("stderr", None)
                result["round"] = round_no
                backups[tool].append(result)
                log(f"  {result['wall_s']:.2f}s, {result['archive_bytes'] / MB:.1f} MB")
            for tool in (["pg_restore", "koan_replace"] if round_no % 2 else ["koan_replace", "pg_restore"]):
                log(f"round {round_no}: restore with {tool} (load {load()})")
                if tool == "pg_restore":
                    result = self.pg_restore(dump, f"{self.name}_pgr")
                else:
                    result = self.koan_restore(f"r{round_no}-restore", koan_id, f"{self.name}_kr")
                result.pop("stderr", None)
                result["round"] = round_no
                if result["rows_restored"] != args.rows:
                    raise RuntimeError(f"{tool} restored {result['rows_restored']} rows, expected {args.rows}")
                restores[tool].append(result)
                log(f"  {result['wall_s']:.2f}s")
            Path(dump).unlink()
        self.results["backup"] = backups
        self.results["restore"] = restores

    def tiny(self) -> None:
        chunks = self.args.tiny_chunks
        self.results["tiny_source"] = self.fill("Tiny", chunks * 10)
        log(f"tiny chunks: {chunks:,} chunks of 10 rows (load {load()})")
        result = self.koan_backup("tiny", "Tiny", 10)
        result.pop("stderr", None)
        result["chunks"] = chunks
        result["chunks_per_s"] = round(chunks / result["wall_s"], 1)
        result["jobs"] = self.job_times("tiny", result["wall_s"])
        log(f"  {result['wall_s']:.2f}s, {result['chunks_per_s']:.0f} chunks/s")
        self.results["tiny_chunks"] = result
        psql(self.name, 'DROP TABLE "Tiny"')

    def job_times(self, label: str, wall: float) -> dict:
        """From the workers' logs: how long export jobs ran (`chunk exported ... elapsed_ms`),
        and which share of the job slots (workers x --concurrency) that kept busy."""
        elapsed = []
        for i in range(1, self.args.workers + 1):
            text = re.sub(r"\x1b\[[0-9;]*m", "", (self.logs / f"{label}-worker-{i}.log").read_text())
            elapsed += [int(x) for x in re.findall(r"chunk exported .*?elapsed_ms=(\d+)", text)]
        if not elapsed:
            return {}
        slots = self.args.workers * self.args.concurrency
        return {"export_jobs": len(elapsed), "job_ms_median": statistics.median(elapsed),
                "job_ms_mean": round(statistics.mean(elapsed), 1), "job_ms_max": max(elapsed),
                "slot_busy_fraction": round(sum(elapsed) / 1000 / (wall * slots), 2)}

    def rss_point(self, rows: int) -> None:
        table = "Order" if self.results.get("source", {}).get("rows") == rows else f"Rss{rows}"
        source = self.fill(table, rows) if table != "Order" else self.results["source"]
        log(f"worker RSS at {rows:,} rows (load {load()})")
        result = self.koan_backup(f"rss-{rows}", table, self.args.chunk_rows)
        result.pop("stderr", None)
        result["rows"] = rows
        result["raw_copy_bytes"] = source["raw_copy_bytes"]
        result["worker_peak_rss_mib"] = max(w["peak_rss_mib"] for w in result["workers"])
        log(f"  {result['wall_s']:.2f}s, worker peak RSS {result['worker_peak_rss_mib']} MiB")
        self.results.setdefault("rss", []).append(result)
        if table != "Order":
            psql(self.name, f'DROP TABLE "{table}"')

    # ---- summary ---------------------------------------------------------------------

    def summarise(self) -> None:
        r = self.results
        summary: dict = {"rows": []}
        targets: dict = {}
        if "backup" in r:
            rows = r["source"]["rows"]
            raw = r["source"]["raw_copy_bytes"]
            med = {tool: statistics.median(x["wall_s"] for x in runs) for tool, runs in
                   {**r["backup"], **r["restore"]}.items()}
            size = {tool: statistics.median(x["archive_bytes"] for x in runs) for tool, runs in r["backup"].items()}
            for tool in ("pg_dump", "copy_zstd", "koan", "pg_restore", "koan_replace"):
                runs = {**r["backup"], **r["restore"]}[tool]
                line = {
                    "step": {"pg_dump": "backup: pg_dump -Fc", "copy_zstd": "backup: COPY | zstd -1",
                             "koan": "backup: koan-backup", "pg_restore": "restore: pg_restore",
                             "koan_replace": "restore: koan replace"}[tool],
                    "wall_s": round(med[tool], 2),
                    "wall_s_all": [x["wall_s"] for x in runs],
                    "rows_per_s": round(rows / med[tool]),
                    "mb_per_s": round(raw / MB / med[tool], 1),
                }
                if tool in size:
                    line["archive_mb"] = round(size[tool] / MB, 1)
                    line["size_vs_pg_dump"] = round(size[tool] / size["pg_dump"], 2)
                    line["size_vs_raw_copy"] = round(size[tool] / raw, 3)
                    line["wall_vs_pg_dump"] = round(med[tool] / med["pg_dump"], 2)
                    line["wall_vs_copy_zstd"] = round(med[tool] / med["copy_zstd"], 2)
                else:
                    line["wall_vs_pg_restore"] = round(med[tool] / med["pg_restore"], 2)
                if tool.startswith("koan"):
                    line["worker_peak_rss_mib"] = max(w["peak_rss_mib"] for x in runs for w in x["workers"])
                    line["worker_cpu_s"] = round(statistics.median(sum(w["cpu_s"] for w in x["workers"]) for x in runs), 1)
                    line["coordinator_peak_rss_mib"] = max(x["coordinator"]["peak_rss_mib"] for x in runs)
                else:
                    line["client_peak_rss_mib"] = max(x["client_peak_rss_mib"] for x in runs)
                    line["client_cpu_s"] = round(statistics.median(x["client_cpu_s"] for x in runs), 1)
                line["load_before"] = [x["load_before"][0] for x in runs]
                line["machine_busy_cores"] = round(statistics.median(x["machine_busy_cores"] for x in runs), 2)
                line["pg_cluster_cpu_s"] = round(statistics.median(x["pg_cluster_cpu_s"] for x in runs), 1)
                summary["rows"].append(line)
            targets["backup_vs_pg_dump"] = round(med["koan"] / med["pg_dump"], 2)
            targets["backup_vs_copy_zstd"] = round(med["koan"] / med["copy_zstd"], 2)
            targets["restore_vs_pg_restore"] = round(med["koan_replace"] / med["pg_restore"], 2)
            # The same ratios within each round: on a machine whose speed drifts
            # (a VM with CPU steal), the steps of one round saw the same drift.
            by_round = {tool: {x["round"]: x["wall_s"] for x in runs}
                        for tool, runs in {**r["backup"], **r["restore"]}.items()}
            summary["ratios_by_round"] = {
                key: [round(by_round[ours][n] / by_round[theirs][n], 2)
                      for n in sorted(by_round[ours]) if n in by_round[theirs]]
                for key, ours, theirs in (("backup_vs_pg_dump", "koan", "pg_dump"),
                                          ("backup_vs_copy_zstd", "koan", "copy_zstd"),
                                          ("restore_vs_pg_restore", "koan_replace", "pg_restore"))}
        workers_rss = [w["peak_rss_mib"] for key in ("backup", "restore") for runs in r.get(key, {}).values()
                       for x in runs for w in x.get("workers", [])]
        workers_rss += [w["peak_rss_mib"] for x in r.get("rss", []) for w in x["workers"]]
        if "tiny_chunks" in r:
            workers_rss += [w["peak_rss_mib"] for w in r["tiny_chunks"]["workers"]]
            targets["tiny_chunks_per_s"] = r["tiny_chunks"]["chunks_per_s"]
        if workers_rss:
            targets["worker_peak_rss_mib"] = max(workers_rss)
        points = {x["rows"]: x["worker_peak_rss_mib"] for x in r.get("rss", [])}
        if len(points) >= 2:
            low, high = points[min(points)], points[max(points)]
            targets["worker_rss_growth"] = round(high / low - 1, 3)
        verdict = {}
        for key, value in targets.items():
            limit = TARGETS[key]
            met = value >= limit if key == "tiny_chunks_per_s" else value <= limit
            verdict[key] = {"measured": value, "target": limit, "met": met}
        summary["targets"] = verdict
        r["summary"] = summary

    def print_table(self) -> None:
        r = self.results
        s = r["summary"]
        print(f"\nkoan-backup bench  {r['started']}  rows={r['args']['rows']:,} workers={r['args']['workers']} "
              f"concurrency={r['args'].get('concurrency', 2)} runs={r['args']['runs']}  nproc={r['machine']['nproc']}")
        print(f"load: start `{r['machine']['uptime_start']}`  end `{r['machine']['uptime_end']}`")
        if "source" in r:
            src = r["source"]
            print(f"source: {src['rows']:,} rows, avg document {src['avg_doc_bytes']} B, "
                  f"raw COPY text {src['raw_copy_bytes'] / MB:.1f} MB, table+index {src['table_bytes'] / MB:.1f} MB")
            print("(medians; MB = 10^6 bytes of raw COPY text per second; RSS in MiB)\n")
            header = f"{'step':26} {'wall s':>7} {'rows/s':>9} {'MB/s':>6} {'archive MB':>10} " \
                     f"{'size/dump':>9} {'size/raw':>8} {'wall/dump':>9} {'wall/copy':>9} {'peak RSS':>18} {'cpu s':>6} " \
                     f"{'pg cpu s':>8} {'busy':>5}"
            print(header)
            print("-" * len(header))
            for line in s["rows"]:
                rss = (f"w {line['worker_peak_rss_mib']:.0f} c {line['coordinator_peak_rss_mib']:.0f}"
                       if "worker_peak_rss_mib" in line else f"client {line['client_peak_rss_mib']:.0f}")
                cpu = line.get("worker_cpu_s", line.get("client_cpu_s"))
                wall_dump = line.get("wall_vs_pg_dump", line.get("wall_vs_pg_restore"))
                print(f"{line['step']:26} {line['wall_s']:7.2f} {line['rows_per_s']:9,} {line['mb_per_s']:6.1f} "
                      f"{_f(line.get('archive_mb'), 10, 1)} {_f(line.get('size_vs_pg_dump'), 9, 2)} "
                      f"{_f(line.get('size_vs_raw_copy'), 8, 3)} {_f(wall_dump, 9, 2)} "
                      f"{_f(line.get('wall_vs_copy_zstd'), 9, 2)} {rss:>18} {cpu:6.1f} "
                      f"{line['pg_cluster_cpu_s']:8.1f} {line['machine_busy_cores']:5.2f}")
            print("(restore rows: wall/dump is wall / pg_restore; cpu s: koan = all workers, else the client "
                  "tools; pg cpu s: the whole PostgreSQL cluster; busy: cores busy on the machine, others' load "
                  "included)")
            for key, ratios in s.get("ratios_by_round", {}).items():
                print(f"  {key} by round: {', '.join(f'{x:.2f}' for x in ratios)}")
        if "tiny_chunks" in r:
            t = r["tiny_chunks"]
            print(f"\ntiny chunks: {t['chunks']:,} chunks of 10 rows in {t['wall_s']:.2f}s = {t['chunks_per_s']:,.0f} "
                  f"chunks/s; worker peak RSS {max(w['peak_rss_mib'] for w in t['workers']):.0f} MiB, "
                  f"coordinator {t['coordinator']['peak_rss_mib']:.0f} MiB, "
                  f"cpu workers {sum(w['cpu_s'] for w in t['workers']):.1f}s coordinator (session) {t['coordinator']['cpu_s']:.1f}s")
            if t.get("jobs"):
                j = t["jobs"]
                print(f"  export jobs: median {j['job_ms_median']} ms, mean {j['job_ms_mean']} ms, max {j['job_ms_max']} ms; "
                      f"job slots busy {j['slot_busy_fraction']:.0%} of the wall time")
        for x in r.get("rss", []):
            print(f"worker peak RSS at {x['rows']:,} rows: {x['worker_peak_rss_mib']:.1f} MiB "
                  f"(each: {', '.join(str(w['peak_rss_mib']) for w in x['workers'])}); backup {x['wall_s']:.2f}s")
        print("\ntargets:")
        for key, v in s["targets"].items():
            op = ">=" if key == "tiny_chunks_per_s" else "<="
            print(f"  {key:24} {v['measured']:>10} {op} {v['target']:<8} {'met' if v['met'] else 'MISSED'}")


def _f(value, width: int, digits: int) -> str:
    return f"{value:{width}.{digits}f}" if value is not None else " " * (width - 1) + "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the compared table (default 2,000,000)")
    parser.add_argument("--workers", type=int, default=2, help="koan worker processes (default 2)")
    parser.add_argument("--concurrency", type=int, default=2,
                        help="jobs each worker runs at once (KOAN_CONCURRENCY; default 2, the worker's default)")
    parser.add_argument("--runs", type=int, default=3, help="rounds of the comparison; 0 skips it (default 3)")
    parser.add_argument("--chunk-rows", type=int, default=None, help="plan chunk_rows (default: the plan default)")
    parser.add_argument("--tiny-chunks", type=int, default=10_000,
                        help="chunks of 10 rows for the per-job overhead run; 0 skips it (default 10,000)")
    parser.add_argument("--rss-rows", default="200000,2000000",
                        help="comma-separated table sizes for worker peak RSS; '' skips (default 200000,2000000)")
    parser.add_argument("--keep", action="store_true", help="keep logs and archives under bench/out/")
    parser.add_argument("--perf", action="store_true",
                        help="perf record -a during round 1's koan backup and restore and the tiny chunks "
                             "(reports kept under bench/out/; implies --keep)")
    args = parser.parse_args()
    if args.workers < 1 or args.concurrency < 1:
        parser.error("--workers and --concurrency must be at least 1")
    args.keep = args.keep or args.perf
    args.rss_rows = [int(x) for x in args.rss_rows.split(",") if x.strip()]

    def interrupted(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    bench = Bench(args)
    try:
        results = bench.run()
    except BaseException:
        bench.args.keep = True  # keep the logs of a failed run
        raise
    finally:
        bench.cleanup()
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    path = out / f"{bench.stamp}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    bench.print_table()
    print(f"\nJSON: {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
