#!/usr/bin/env python3
"""pg_billing benchmarks: pg_billing side by side with a PL/pgSQL reference and raw SQL, in one run.

Runs against PGDATABASE (with pg_billing installed) using pgbench -M prepared. Implementations of
one workload run interleaved (A B C A B C ...) for several short rounds; the report gives medians
and the ratios pair by pair. Environment:
  BENCH_ROUNDS (5)  BENCH_SECONDS (10)  BENCH_SCALE (1.0: the sizes the issue names)
  BENCH_SMOKE=1     seconds-long run that only checks the harness works (CI)
  BENCH_OUT         report path (default benches/results/<date>-<host>.md)
"""
import datetime
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psycopg2
import psycopg2.errors

HERE = Path(__file__).resolve().parent
SMOKE = os.environ.get("BENCH_SMOKE") == "1"
ROUNDS = 1 if SMOKE else int(os.environ.get("BENCH_ROUNDS", "5"))
SECONDS = 2 if SMOKE else int(os.environ.get("BENCH_SECONDS", "10"))
SCALE = 0.001 if SMOKE else float(os.environ.get("BENCH_SCALE", "1.0"))
USERS = 10_000
DB = os.environ.get("PGDATABASE", "bench")
results = []   # (section, line) for the report
targets = []   # (target, met: bool, figures)


def conn():
    c = psycopg2.connect(dbname=DB)
    c.autocommit = True
    return c


def sql(q, params=None):
    c = conn()
    try:
        with c.cursor() as cur:
            cur.execute(q, params)
            return cur.fetchall() if cur.description else None
    finally:
        c.close()


def uid(i):
    return f"00000000-0000-4000-8000-{i:012x}"


def pgbench(script, clients, seconds, defines=None, pgoptions=None, log_dir=None, transactions=None):
    cmd = ["pgbench", "-n", "-M", "prepared", "-c", str(clients), "-j", str(min(clients, 2)), "-f", str(HERE / script), DB]
    cmd += ["-t", str(transactions)] if transactions else ["-T", str(seconds)]
    for k, v in (defines or {}).items():
        cmd += ["-D", f"{k}={v}"]
    if log_dir:
        cmd += ["-l", "--log-prefix", os.path.join(log_dir, "pgbench_log")]
    env = dict(os.environ)
    if pgoptions:
        env["PGOPTIONS"] = pgoptions
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=log_dir or None)
    if out.returncode != 0:
        raise RuntimeError(f"pgbench failed: {' '.join(cmd)}\n{out.stdout}\n{out.stderr}")
    tps = float(re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout).group(1))
    lat = float(re.search(r"latency average = ([0-9.]+) ms", out.stdout).group(1))
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    if failed and int(failed.group(1)) > 0:
        raise RuntimeError(f"pgbench saw failed transactions:\n{out.stdout}")
    p99 = None
    if log_dir:
        lats = []
        for f in Path(log_dir).glob("pgbench_log*"):
            for line in f.read_text().splitlines():
                parts = line.split()
                if len(parts) >= 3:
                    lats.append(int(parts[2]))
        lats.sort()
        p99 = lats[int(len(lats) * 0.99) - 1] / 1000.0 if lats else None
    return tps, lat, p99


def interleaved(name, impls, clients, defines, pgoptions=None, want_p99=False):
    """impls: {label: script}. Returns {label: {tps: [...], lat: [...], p99: [...]}}."""
    runs = {k: {"tps": [], "lat": [], "p99": []} for k in impls}
    for r in range(ROUNDS):
        for label, script in impls.items():
            with tempfile.TemporaryDirectory() as d:
                os.chmod(d, 0o777)
                tps, lat, p99 = pgbench(script, clients, SECONDS, defines, pgoptions, log_dir=d if want_p99 else None)
            runs[label]["tps"].append(tps)
            runs[label]["lat"].append(lat)
            if p99 is not None:
                runs[label]["p99"].append(p99)
            print(f"  {name} round {r + 1} {label}: {tps:,.0f} tps, {lat:.3f} ms avg" + (f", p99 {p99:.3f} ms" if p99 else ""), flush=True)
    med = {k: {m: (statistics.median(v[m]) if v[m] else None) for m in v} for k, v in runs.items()}
    lines = [f"| implementation | median tps | median latency (ms) |" + (" median p99 (ms) |" if want_p99 else "") + " tps per round |",
             "|---|---|---|" + ("---|" if want_p99 else "") + "---|"]
    for k in impls:
        lines.append(f"| {k} | {med[k]['tps']:,.0f} | {med[k]['lat']:.3f} |" + (f" {med[k]['p99']:.3f} |" if want_p99 else "")
                     + " " + ", ".join(f"{t:,.0f}" for t in runs[k]["tps"]) + " |")
    labels = list(impls)
    for i in range(len(labels)):
        for j in range(i + 1, len(labels)):
            a, b = labels[i], labels[j]
            lines.append(f"\nratio {a} / {b} (tps): **{med[a]['tps'] / med[b]['tps']:.2f}x**")
    results.append((name, "\n".join(lines)))
    return med


def setup_consume():
    sql((HERE / "plpgsql_reference.sql").read_text())
    n = sql("SELECT count(*) FROM billing.accounts WHERE user_id::text LIKE '00000000-0000-4000-8000-%'")[0][0]
    if n < USERS:
        sql("""SELECT count(billing.add_subscription_credits(('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, 1000000)),
                      count(billing.add_purchased_credits(('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, 2000000000))
                 FROM generate_series(1, %s) AS i""", (USERS,))
    sql("VACUUM ANALYZE billing.accounts")


CONSUME = {"pg_billing (Rust)": "consume_rust.sql", "PL/pgSQL reference": "consume_plpgsql.sql", "raw SQL statement": "consume_raw.sql"}


def bench_consume():
    setup_consume()
    print("consume_credits_v2: uniform, 4 clients, synchronous_commit=off", flush=True)
    m = interleaved("consume, uniform over 10,000 users, 4 clients, synchronous_commit=off (CPU-bound)", CONSUME, 4,
                    {"users": USERS}, "-c synchronous_commit=off")
    r_pl = m["pg_billing (Rust)"]["tps"] / m["PL/pgSQL reference"]["tps"]
    r_raw = m["pg_billing (Rust)"]["tps"] / m["raw SQL statement"]["tps"]
    targets.append(("consume_credits_v2 >= 1.3x the PL/pgSQL reference (CPU-bound)", r_pl >= 1.3, f"{r_pl:.2f}x"))
    targets.append(("consume_credits_v2 >= 0.9x raw SQL (CPU-bound)", r_raw >= 0.9, f"{r_raw:.2f}x"))
    print("consume_credits_v2: uniform, 4 clients, synchronous_commit=on", flush=True)
    interleaved("consume, uniform over 10,000 users, 4 clients, synchronous_commit=on", CONSUME, 4, {"users": USERS}, "-c synchronous_commit=on")
    print("consume_credits_v2: one hot user, 8 clients", flush=True)
    interleaved("consume, one hot user, 8 clients (row-lock bound), synchronous_commit=off", CONSUME, 8, {"users": 1}, "-c synchronous_commit=off")
    print("consume_credits_v2: p99 at 8 clients uniform", flush=True)
    m = interleaved("consume, uniform, 8 clients, synchronous_commit=off: latency percentiles", CONSUME, 8, {"users": USERS},
                    "-c synchronous_commit=off", want_p99=True)
    p99 = m["pg_billing (Rust)"]["p99"]
    targets.append(("p99 <= 2 ms at 8 clients uniform", p99 is not None and p99 <= 2.0, f"p99 {p99:.3f} ms"))


def bench_growth():
    print("cost growth with ledger size", flush=True)
    setup_consume()
    sizes = [0, int(1_000_000 * SCALE), int(5_000_000 * SCALE)]
    sql("TRUNCATE billing.credit_transactions")
    lines = ["| ledger rows present | median latency (ms), 1 client | median tps |", "|---|---|---|"]
    per = []
    present = 0
    for n in sizes:
        if n > present:
            # Old ledger rows spread over the same users the workload consumes for.
            sql("""INSERT INTO billing.credit_transactions (user_id, operation_id, type, pool, amount, balance_after, created_at)
                   SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(1 + i %% %s), 12, '0'))::uuid, gen_random_uuid(), 'usage',
                          'purchased', -1, 1, now() - interval '1 year'
                     FROM generate_series(1, %s) AS i""", (USERS, n - present))
            sql("VACUUM ANALYZE billing.credit_transactions")
            present = n
        lat = []
        tps = []
        for _ in range(ROUNDS):
            t, l, _p = pgbench("consume_rust.sql", 1, SECONDS, {"users": USERS}, "-c synchronous_commit=off")
            lat.append(l)
            tps.append(t)
        per.append(statistics.median(lat))
        lines.append(f"| {n:,} | {statistics.median(lat):.4f} | {statistics.median(tps):,.0f} |")
        print(f"  {n:,} rows: {statistics.median(lat):.4f} ms", flush=True)
    change = (per[-1] - per[0]) / per[0] * 100
    lines.append(f"\nchange from {sizes[0]:,} to {sizes[-1]:,} rows: **{change:+.1f}%**")
    results.append(("cost growth: per-call time of consume_credits_v2 with ledger rows already present", "\n".join(lines)))
    targets.append((f"per-call time changes <= 10% from 0 to {sizes[-1]:,} ledger rows", abs(change) <= 10, f"{change:+.1f}%"))
    # the ledger is only for the bench; the balances no longer match it
    sql("TRUNCATE billing.credit_transactions")


def rss_kb(pid, field="RssAnon"):
    """RssAnon: the backend's private memory (what a leak grows). VmRSS also counts the
    shared-buffer pages the backend has touched, which grow towards shared_buffers."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def bench_memory():
    calls = max(1000, int(1_000_000 * SCALE))
    print(f"memory: one backend, {calls:,} calls", flush=True)
    c = conn()
    cur = c.cursor()
    cur.execute("SELECT pg_backend_pid()")
    pid = cur.fetchone()[0]
    cur.execute("PREPARE c(uuid) AS SELECT billing.consume_credits_v2($1, 1)")
    for i in range(1, 201):  # warm up: plans prepared, caches filled
        cur.execute("EXECUTE c(%s)", (uid(i % USERS + 1),))
    before, before_total = rss_kb(pid), rss_kb(pid, "VmRSS")
    t0 = time.time()
    batch = 1000
    stmt = ";".join(["EXECUTE c(%s)"] * batch)
    done = 0
    while done < calls:
        cur.execute(stmt, [uid((done + k) % USERS + 1) for k in range(batch)])
        done += batch
    after, after_total = rss_kb(pid), rss_kb(pid, "VmRSS")
    took = time.time() - t0
    c.close()
    growth_mb = (after - before) / 1024
    results.append(("memory: one backend's RSS over many consume_credits_v2 calls",
                    f"| calls | private RSS before (MB) | private RSS after (MB) | growth (MB) | VmRSS before / after (MB, includes shared buffers touched) | time (s) |\n|---|---|---|---|---|---|\n"
                    f"| {calls:,} | {before / 1024:.1f} | {after / 1024:.1f} | {growth_mb:+.1f} | {before_total / 1024:.1f} / {after_total / 1024:.1f} | {took:.1f} |"))
    targets.append((f"RSS grows < 10 MB over {calls:,} calls (private memory)", growth_mb < 10, f"{growth_mb:+.1f} MB"))
    print(f"  RSS {before} kB -> {after} kB", flush=True)


def bench_resource_limit():
    big = int(1_000_000 * SCALE) or 1000
    print(f"check_resource_limit: 1,000 rows of one user in a {big:,}-row table vs a 1,000-row table", flush=True)
    sql("""DROP TABLE IF EXISTS public.bench_agents_big, public.bench_agents_small;
           CREATE TABLE public.bench_agents_big (id bigserial PRIMARY KEY, user_id uuid NOT NULL);
           CREATE TABLE public.bench_agents_small (id bigserial PRIMARY KEY, user_id uuid NOT NULL);""")
    sql("""INSERT INTO public.bench_agents_big (user_id)
           SELECT CASE WHEN i <= 1000 THEN '00000000-0000-4000-8000-000000000001'::uuid
                       ELSE ('00000000-0000-4000-8000-' || lpad(to_hex(2 + i %% 100000), 12, '0'))::uuid END
             FROM generate_series(1, %s) AS i""", (max(big, 1000),))
    sql("INSERT INTO public.bench_agents_small (user_id) SELECT '00000000-0000-4000-8000-000000000001' FROM generate_series(1, 1000)")
    sql("CREATE INDEX ON public.bench_agents_big (user_id); CREATE INDEX ON public.bench_agents_small (user_id)")
    sql("VACUUM ANALYZE public.bench_agents_big")
    sql("VACUUM ANALYZE public.bench_agents_small")
    sql("""SELECT billing.register_resource('bench_big', 'public.bench_agents_big', 'user_id', 'agents');
           SELECT billing.register_resource('bench_small', 'public.bench_agents_small', 'user_id', 'agents');""")
    with tempfile.NamedTemporaryFile("w", suffix=".sql", dir=HERE, delete=False) as f1, \
         tempfile.NamedTemporaryFile("w", suffix=".sql", dir=HERE, delete=False) as f2:
        f1.write("SELECT * FROM billing.check_resource_limit('00000000-0000-4000-8000-000000000001', 'bench_big');\n")
        f2.write("SELECT * FROM billing.check_resource_limit('00000000-0000-4000-8000-000000000001', 'bench_small');\n")
    try:
        m = interleaved(f"check_resource_limit: a user with 1,000 rows, in a {big:,}-row table vs a 1,000-row table, 1 client",
                        {f"{big:,}-row table": Path(f1.name).name, "1,000-row table": Path(f2.name).name}, 1, {})
    finally:
        os.unlink(f1.name)
        os.unlink(f2.name)
    a, b = m[f"{big:,}-row table"]["lat"], m["1,000-row table"]["lat"]
    targets.append(("check_resource_limit time depends on the user's rows, not the table's (within 25%)",
                    abs(a - b) / b <= 0.25, f"{a:.3f} ms vs {b:.3f} ms"))


def bench_widgets():
    users = max(100, int(100_000 * SCALE))
    print(f"get_user_widgets_ordered: 9 widget tables, 50 widgets per user, {users:,} users", flush=True)
    types = ["links", "gallery", "youtube", "text", "music", "shop", "social", "form", "map"]
    for t in types:
        sql(f"""DROP TABLE IF EXISTS public.widget_{t};
                CREATE TABLE public.widget_{t} (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), user_id uuid NOT NULL,
                    position integer NOT NULL, is_active boolean NOT NULL DEFAULT true, title text,
                    created_at timestamptz NOT NULL DEFAULT now(), updated_at timestamptz NOT NULL DEFAULT now());""")
    # 50 widgets per user spread over the 9 tables (6 in the first 5 tables, 5 in the other 4).
    for k, t in enumerate(types):
        per = 6 if k < 5 else 5
        sql(f"""INSERT INTO public.widget_{t} (user_id, position, title)
                SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(u), 12, '0'))::uuid, {k} + 9 * j, 'w'
                  FROM generate_series(1, %s) AS u, generate_series(0, {per - 1}) AS j""", (users,))
        sql(f"CREATE INDEX ON public.widget_{t} (user_id)")
        sql(f"VACUUM ANALYZE public.widget_{t}")
    with open(HERE / "widgets_bench.sql", "w") as f:
        f.write("\\set uid random(1, :users)\n"
                "SELECT count(*) FROM billing.get_user_widgets_ordered(('00000000-0000-4000-8000-' || lpad(to_hex(:uid::integer), 12, '0'))::uuid);\n")
    try:
        interleaved(f"get_user_widgets_ordered: 9 tables, 50 widgets per user, {users:,} users, 4 clients",
                    {"get_user_widgets_ordered": "widgets_bench.sql"}, 4, {"users": users})
    finally:
        os.unlink(HERE / "widgets_bench.sql")
        for t in types:
            sql(f"DROP TABLE public.widget_{t}")


def bench_rate_and_usage():
    print("check_api_rate_limit and record_message_usage", flush=True)
    sql("UPDATE billing.plans SET api_rate_limit_hourly = -1 WHERE plan_id = 'free'")
    files = {
        "rate_uniform.sql": "\\set uid random(1, :users)\nSELECT * FROM billing.check_api_rate_limit(('00000000-0000-4000-8000-' || lpad(to_hex(:uid::integer), 12, '0'))::uuid, '/v1/x');\n",
        "usage_uniform.sql": "\\set uid random(1, :users)\nSELECT billing.record_message_usage(('00000000-0000-4000-8000-' || lpad(to_hex(:uid::integer), 12, '0'))::uuid, 100, 200);\n",
    }
    for n, body in files.items():
        (HERE / n).write_text(body)
    try:
        interleaved("check_api_rate_limit, uniform over 10,000 users, 4 clients (unlimited plan, so every call writes)",
                    {"check_api_rate_limit": "rate_uniform.sql"}, 4, {"users": USERS}, "-c synchronous_commit=off")
        interleaved("check_api_rate_limit, one user, 8 clients", {"check_api_rate_limit": "rate_uniform.sql"}, 8, {"users": 1},
                    "-c synchronous_commit=off")
        interleaved("record_message_usage, uniform over 10,000 users, 4 clients", {"record_message_usage": "usage_uniform.sql"}, 4,
                    {"users": USERS}, "-c synchronous_commit=off")
    finally:
        for n in files:
            os.unlink(HERE / n)
        sql("UPDATE billing.plans SET api_rate_limit_hourly = 50 WHERE plan_id = 'free'")


def svg_chart(rows):
    """rows: [(label, ratio)] -> a horizontal bar chart of ratios, with 1.0x and targets marked."""
    w, bar, gap, left = 760, 26, 12, 330
    h = 60 + len(rows) * (bar + gap)
    mx = max([r for _, r in rows] + [1.5]) * 1.1
    x = lambda v: left + (w - left - 40) * v / mx
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13">',
           f'<text x="10" y="22" font-size="15" font-weight="bold">pg_billing consume_credits_v2: throughput ratios (same run)</text>']
    for i, (label, r) in enumerate(rows):
        y = 40 + i * (bar + gap)
        out.append(f'<text x="10" y="{y + 17}">{label}</text>')
        out.append(f'<rect x="{left}" y="{y}" width="{x(r) - left:.1f}" height="{bar}" fill="#3b82f6"/>')
        out.append(f'<text x="{x(r) + 5:.1f}" y="{y + 17}">{r:.2f}x</text>')
    for v, color, name in [(1.0, "#111", "1.0x"), (1.3, "#dc2626", "1.3x"), (0.9, "#d97706", "0.9x")]:
        out.append(f'<line x1="{x(v):.1f}" y1="32" x2="{x(v):.1f}" y2="{h - 8}" stroke="{color}" stroke-dasharray="4,3"/>')
        out.append(f'<text x="{x(v) + 3:.1f}" y="{h - 10}" fill="{color}" font-size="11">{name}</text>')
    out.append("</svg>")
    return "\n".join(out)


SEED = {"pg_billing (Rust)": "consume_rust.sql", "seed-style PL/pgSQL (own tables)": "consume_seed.sql"}


def setup_seed():
    """The second baseline (issue 16): the seed apps' own consume_credits_v2 on their own tables."""
    sql((HERE / "seed_style.sql").read_text())
    n = sql("SELECT count(*) FROM bench_seed.profiles")[0][0]
    if n < USERS:
        sql("""INSERT INTO bench_seed.profiles (id, subscription_credits, purchased_credits)
               SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(i), 12, '0'))::uuid, 1000000, 2000000000
                 FROM generate_series(1, %s) AS i ON CONFLICT DO NOTHING""", (USERS,))
    sql("VACUUM ANALYZE bench_seed.profiles")


def wal_per_call(script, calls):
    """WAL bytes per call in steady state without full-page images: full_page_writes off for the
    measurement, a first pass to warm the pages, then the measured pass (one client). Also what
    those bytes are: pg_waldump --stats=record over the measured pass, as {record type: (records
    per call, bytes per call)} (what bounds the figure: the records each call writes)."""
    pgbench(script, 1, None, {"users": USERS}, "-c synchronous_commit=off", transactions=calls)
    a = sql("SELECT pg_current_wal_insert_lsn()")[0][0]
    pgbench(script, 1, None, {"users": USERS}, "-c synchronous_commit=off", transactions=calls)
    b = sql("SELECT pg_current_wal_insert_lsn()")[0][0]
    sql("SELECT pg_switch_wal()")   # the measured range is then in closed segments pg_waldump reads whole
    bindir = sql("SELECT setting FROM pg_catalog.pg_config WHERE name = 'BINDIR'")[0][0]
    waldir = os.path.join(sql("SHOW data_directory")[0][0], "pg_wal")
    out = subprocess.run([os.path.join(bindir, "pg_waldump"), "--stats=record", "-p", waldir, "-s", a, "-e", b],
                         capture_output=True, text=True)
    kinds = {}
    for line in out.stdout.splitlines():
        m = re.match(r"^(\S+/\S+)\s+(\d+)\s+\(\s*[\d.]+\)\s+(\d+)\s+\(\s*[\d.]+\)\s+(\d+)\s+\(\s*[\d.]+\)\s+(\d+)", line)
        if m and int(m.group(2)) > 0:
            kinds[m.group(1)] = (int(m.group(2)) / calls, int(m.group(5)) / calls)
    if not kinds:
        raise RuntimeError(f"pg_waldump printed no records:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return float(sql("SELECT pg_wal_lsn_diff(%s, %s)", (b, a))[0][0]) / calls, kinds


def wal_table(kinds):
    """The per-call WAL records of each implementation side by side (records and bytes per call)."""
    names = list(kinds)
    types = sorted({t for k in kinds.values() for t in k}, key=lambda t: -max(k.get(t, (0, 0))[1] for k in kinds.values()))
    rows = [f"| {t} | " + " | ".join(f"{kinds[n].get(t, (0, 0))[0]:.2f} | {kinds[n].get(t, (0, 0))[1]:,.0f}" for n in names) + " |"
            for t in types if max(kinds[n].get(t, (0, 0))[0] for n in names) >= 0.01]
    total = "| **total** | " + " | ".join(f"{sum(v[0] for v in kinds[n].values()):.2f} | {sum(v[1] for v in kinds[n].values()):,.0f}"
                                      for n in names) + " |"
    head = "| record type | " + " | ".join(f"{n}: records | bytes" for n in names) + " |\n|---|" + "---|---|" * len(names)
    return head + "\n" + "\n".join(rows + [total])


def bench_seed():
    """consume_credits_v2 beside the seed-style function (issue 16 item 1), at 0 and 5M ledger
    rows, CPU-bound and with synchronous_commit on, one hot account, and WAL bytes per call."""
    setup_consume()
    setup_seed()
    sql("TRUNCATE billing.credit_transactions, bench_seed.credit_transactions")
    calls = 200 if SMOKE else 20_000
    sql("ALTER SYSTEM SET full_page_writes = off")
    sql("SELECT pg_reload_conf()")
    try:
        measured = {k: wal_per_call(v, calls) for k, v in SEED.items()}
    finally:
        sql("ALTER SYSTEM RESET full_page_writes")
        sql("SELECT pg_reload_conf()")
    wal = {k: v[0] for k, v in measured.items()}
    rw = wal["pg_billing (Rust)"] / wal["seed-style PL/pgSQL (own tables)"]
    results.append(("WAL bytes per call (steady state, full_page_writes off, one client)",
                    "| implementation | WAL bytes per call |\n|---|---|\n"
                    + "\n".join(f"| {k} | {v:,.0f} |" for k, v in wal.items())
                    + f"\n\nratio pg_billing / seed-style: **{rw:.2f}x**\n\n"
                    + "What each call writes (pg_waldump --stats=record over the measured pass, per call):\n\n"
                    + wal_table({k: v[1] for k, v in measured.items()})))
    targets.append(("WAL bytes per call <= 0.8x the seed-style function", rw <= 0.8, f"{rw:.2f}x"))
    print(f"  WAL per call: " + ", ".join(f"{k} {v:,.0f} B" for k, v in wal.items()), flush=True)
    m0 = interleaved("consume beside the seed-style function, 0 ledger rows, 4 clients, synchronous_commit=off", SEED, 4,
                     {"users": USERS}, "-c synchronous_commit=off")
    n = int(5_000_000 * SCALE)
    sql("""INSERT INTO billing.credit_transactions (user_id, operation_id, type, pool, amount, balance_after, created_at)
           SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(1 + i %% %s), 12, '0'))::uuid, gen_random_uuid(), 'usage',
                  'purchased', -1, 1, now() - interval '1 year'
             FROM generate_series(1, %s) AS i""", (USERS, n))
    sql("""INSERT INTO bench_seed.credit_transactions (user_id, amount, type, created_at)
           SELECT ('00000000-0000-4000-8000-' || lpad(to_hex(1 + i %% %s), 12, '0'))::uuid, -1, 'usage', now() - interval '1 year'
             FROM generate_series(1, %s) AS i""", (USERS, n))
    sql("VACUUM ANALYZE billing.credit_transactions")
    sql("VACUUM ANALYZE bench_seed.credit_transactions")
    m5 = interleaved(f"consume beside the seed-style function, {n:,} ledger rows, 4 clients, synchronous_commit=off", SEED, 4,
                     {"users": USERS}, "-c synchronous_commit=off")
    ms = interleaved("consume beside the seed-style function, 8 clients, synchronous_commit=on", SEED, 8,
                     {"users": USERS}, "-c synchronous_commit=on")
    mh = interleaved("consume beside the seed-style function, one hot account, 8 clients, synchronous_commit=off", SEED, 8,
                     {"users": 1}, "-c synchronous_commit=off")
    for label, m, want in [("0 ledger rows, CPU-bound", m0, 1.3), (f"{n:,} ledger rows, CPU-bound", m5, 1.3),
                           ("synchronous_commit on, 8 clients", ms, 1.0), ("one hot account, 8 clients", mh, 1.0)]:
        r = m["pg_billing (Rust)"]["tps"] / m["seed-style PL/pgSQL (own tables)"]["tps"]
        targets.append((f"consume_credits_v2 >= {want}x the seed-style function ({label})", r >= want, f"{r:.2f}x"))
    sql("TRUNCATE billing.credit_transactions, bench_seed.credit_transactions")


def bench_holds():
    """Credit holds (0.5.0): a reserve + capture pair against the two consume calls it replaces
    (the same credits charged), both per pgbench transaction, on the consume users."""
    setup_consume()
    print("reserve_credits + capture_hold beside two consume_credits_v2 calls", flush=True)
    who = "('00000000-0000-4000-8000-' || lpad(to_hex(:uid::integer), 12, '0'))::uuid"
    files = {
        "hold_pair.sql": f"\\set uid random(1, :users)\nSELECT billing.reserve_credits({who}, 5) ->> 'hold_id' AS hold \\gset\n"
                         "SELECT billing.capture_hold(:hold::uuid, 3);\n",
        "consume_two.sql": f"\\set uid random(1, :users)\nSELECT billing.consume_credits_v2({who}, 2);\n"
                           f"SELECT billing.consume_credits_v2({who}, 1);\n",
    }
    for n, body in files.items():
        (HERE / n).write_text(body)
    try:
        interleaved("reserve + capture pair beside two consume calls, uniform over 10,000 users, 4 clients, synchronous_commit=off",
                    {"reserve_credits + capture_hold": "hold_pair.sql", "two consume_credits_v2": "consume_two.sql"}, 4,
                    {"users": USERS}, "-c synchronous_commit=off")
    finally:
        for n in files:
            os.unlink(HERE / n)


RULE_PREFIX = "00000000-0000-4000-9000-"     # the users of the events step that have a balance rule


def bench_events():
    """Events (0.6.0): consume_credits_v2 on accounts without a balance rule beside the same call
    on accounts whose rule the calls never cross (it is checked after every write, under the
    lock), in the same run."""
    setup_consume()
    n = sql(f"SELECT count(*) FROM billing.accounts WHERE user_id::text LIKE '{RULE_PREFIX}%%'")[0][0]
    if n < USERS:
        sql(f"""SELECT count(billing.add_subscription_credits(('{RULE_PREFIX}' || lpad(to_hex(i), 12, '0'))::uuid, 1000000)),
                       count(billing.add_purchased_credits(('{RULE_PREFIX}' || lpad(to_hex(i), 12, '0'))::uuid, 2000000000)),
                       count(billing.set_balance_alert(100, ('{RULE_PREFIX}' || lpad(to_hex(i), 12, '0'))::uuid))
                  FROM generate_series(1, %s) AS i""", (USERS,))
    sql("VACUUM ANALYZE billing.accounts")
    before = sql("SELECT count(*) FROM billing.events")[0][0]
    (HERE / "consume_rule.sql").write_text(
        "\\set uid random(1, :users)\n"
        f"SELECT billing.consume_credits_v2(('{RULE_PREFIX}' || lpad(to_hex(:uid::integer), 12, '0'))::uuid, 1);\n")
    print("events: consume_credits_v2 without a balance rule beside with a rule not crossed", flush=True)
    try:
        m = interleaved("events: consume_credits_v2 without a balance rule beside with a user rule not crossed, uniform over "
                        "10,000 users each, 4 clients, synchronous_commit=off",
                        {"no rule": "consume_rust.sql", "a user rule, not crossed": "consume_rule.sql"}, 4,
                        {"users": USERS}, "-c synchronous_commit=off")
    finally:
        os.unlink(HERE / "consume_rule.sql")
    written = sql("SELECT count(*) FROM billing.events")[0][0] - before
    if written:
        raise RuntimeError(f"the events step wrote {written} events: a rule was crossed")
    r = m["a user rule, not crossed"]["tps"] / m["no rule"]["tps"]
    results.append(("events: the cost of a balance rule that is not crossed",
                    f"a user rule not crossed / no rule (tps): **{r:.2f}x**; events written during the step: {written}"))


def bench_delivery():
    """Events (0.6.0): delivery throughput. 100,000 events (100 per user for 1,000 users, written
    round-robin under the account locks in one setup transaction by billing._emit_event), then a
    fresh consumer drains them: one worker looping claim_events(consumer, 1000) + ack_events(
    consumer, highest id, claim_id) until all are acknowledged; then another fresh consumer with 4
    such workers at once (a worker whose claim comes back empty while others hold the rest tries
    again 10 ms later). Prints events per second claimed and acknowledged."""
    import threading
    per_user, users = (10, 100) if SMOKE else (100, 1000)
    total = per_user * users
    prefix = "00000000-0000-4000-a000-"
    sql(f"""SELECT count(billing.add_purchased_credits(('{prefix}' || lpad(to_hex(i), 12, '0'))::uuid, 10))
              FROM generate_series(1, %s) AS i
             WHERE NOT EXISTS (SELECT 1 FROM billing.accounts AS a WHERE a.user_id = ('{prefix}' || lpad(to_hex(i), 12, '0'))::uuid)""",
        (users,))
    c = conn()
    c.autocommit = False
    with c.cursor() as cur:
        cur.execute(f"""SELECT count(*) FROM (SELECT 1 FROM billing.accounts WHERE user_id::text LIKE '{prefix}%%'
                          ORDER BY user_id FOR UPDATE) AS l""")
        cur.execute(f"""SELECT count(billing._emit_event(('{prefix}' || lpad(to_hex(i), 12, '0'))::uuid, 'bench.delivery',
                                                         jsonb_build_object('n', k, 'available', 1000 - k, 'threshold', 100)))
                          FROM generate_series(1, %s) AS k, generate_series(1, %s) AS i""", (per_user, users))
    c.commit()
    c.close()
    sql("VACUUM ANALYZE billing.events")
    in_table = sql("SELECT count(*) FROM billing.events")[0][0]
    lines = ["| workers | batch | events | seconds | events/s claimed and acknowledged | claims | empty claims (the rest was claimed) | deadlocks retried |",
             "|---|---|---|---|---|---|---|---|"]
    tag = str(int(time.time()))
    for workers in (1, 4):
        consumer = f"bench-{workers}w-{tag}"
        done, claims, deadlocks, empty, errors = [0], [0], [0], [0], []
        lock = threading.Lock()
        start = threading.Barrier(workers)

        def worker():
            w = conn()
            start.wait()
            try:
                while True:
                    try:
                        with w.cursor() as cur:
                            cur.execute("SELECT claim_id, id, user_id, type, payload FROM billing.claim_events(%s, 1000)", (consumer,))
                            rows = cur.fetchall()
                            if not rows:
                                # (another worker holds what is left, or all is done)
                                with lock:
                                    if done[0] >= in_table:
                                        return
                                    empty[0] += 1
                                time.sleep(0.01)
                                continue
                            cur.execute("SELECT billing.ack_events(%s, %s, %s)", (consumer, max(r[1] for r in rows), rows[0][0]))
                            n = cur.fetchone()[0]
                    except psycopg2.errors.DeadlockDetected:
                        with lock:
                            deadlocks[0] += 1
                        continue
                    with lock:
                        done[0] += n
                        claims[0] += 1
                        if n != len(rows):
                            errors.append(f"ack_events acknowledged {n} of {len(rows)}")
            finally:
                w.close()

        ts = [threading.Thread(target=worker) for _ in range(workers)]
        t0 = time.time()
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        took = time.time() - t0
        left = sql("SELECT count(*) FROM billing.claim_events(%s, 10000)", (consumer,))[0][0]
        if errors or done[0] != in_table or left:
            raise RuntimeError(f"delivery with {workers} workers: acknowledged {done[0]} of {in_table}, {left} left, {errors[:3]}")
        rate = done[0] / took
        lines.append(f"| {workers} | 1,000 | {done[0]:,} | {took:.2f} | **{rate:,.0f}** | {claims[0]:,} | {empty[0]:,} | {deadlocks[0]} |")
        print(f"  delivery, {workers} worker(s): {done[0]:,} events in {took:.2f} s = {rate:,.0f} events/s claimed and "
              f"acknowledged ({claims[0]} claims, {empty[0]} empty, {deadlocks[0]} deadlocks retried)", flush=True)
    results.append((f"events: delivery throughput ({in_table:,} events in the table, {total:,} written for the step: "
                    f"{per_user} for each of {users:,} users, round-robin)", "\n".join(lines)))


def main():
    t0 = time.time()
    host = socket.gethostname()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    default = Path(tempfile.gettempdir()) / f"pg_billing-bench-smoke-{date}-{host}.md" if SMOKE else HERE / "results" / f"{date}-{host}.md"
    out = Path(os.environ.get("BENCH_OUT") or default)
    only = [a for a in sys.argv[1:] if not a.startswith("-")]
    steps = [("consume", bench_consume), ("growth", bench_growth), ("memory", bench_memory),
             ("resource", bench_resource_limit), ("widgets", bench_widgets), ("rate", bench_rate_and_usage),
             ("holds", bench_holds), ("events", bench_events), ("delivery", bench_delivery), ("seed", bench_seed),
             ("batch", lambda: __import__("batch").bench_batch(results, targets))]
    for name, fn in steps:
        if not only or name in only:
            fn()
    pg = sql("SELECT version()")[0][0]
    cpu = next((l.split(":", 1)[1].strip() for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")), "?")
    lines = [f"# pg_billing benchmark, {date}, {host}", "",
             f"- machine: {os.cpu_count()} cores ({cpu}), {round(os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30)} GiB",
             f"- {pg}", f"- pgbench -M prepared; {ROUNDS} interleaved rounds of {SECONDS} s per implementation; medians; scale {SCALE}",
             f"- total time {time.time() - t0:.0f} s" + (" (SMOKE run: harness check only, figures mean nothing)" if SMOKE else ""), "",
             "## Targets", "", "| target | met | figure |", "|---|---|---|"]
    lines += [f"| {t} | {'yes' if ok else 'NO'} | {fig} |" for t, ok, fig in targets]
    for name, body in results:
        lines += ["", f"## {name}", "", body]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    ratios = []
    for name, body in results:
        if "consume" not in name:
            continue
        short = name.split(",")[1].strip() if "," in name else name
        for m in re.finditer(r"ratio (.+?) / (.+?) \(tps\): \*\*([0-9.]+)x\*\*", body):
            if m.group(1).startswith("pg_billing"):
                ratios.append((f"{short}: Rust / {'PL/pgSQL' if 'PL/pgSQL' in m.group(2) else 'raw SQL'}", float(m.group(3))))
    if ratios:
        out.with_suffix(".svg").write_text(svg_chart(ratios))
    print(f"report: {out}")
    print("\n".join(lines[:20]))


if __name__ == "__main__":
    main()
