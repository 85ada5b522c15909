"""What the cluster harnesses share (tests/citus/crash.py, tests/citus/upgrade.py): the nodes
scripts/citus-check.sh started (COORD_PORT, W1_PORT, W2_PORT on PGHOST) and where a user lives."""
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))
from pgb_testlib import connect as _connect, q  # noqa: E402,F401  (q: for the harnesses)

HOST = os.environ.get("PGHOST", "127.0.0.1")
COORD, W1, W2 = (int(os.environ[k]) for k in ("COORD_PORT", "W1_PORT", "W2_PORT"))
NODES = (COORD, W1, W2)


def connect(port, dbname):
    """An autocommit connection as postgres to a node's database."""
    return _connect(host=HOST, port=port, dbname=dbname, user="postgres")


def worker_of(conn, user):
    """The port of the worker that holds the user's accounts shard."""
    return q(conn, """SELECT p.nodeport FROM pg_dist_placement AS pl JOIN pg_dist_node AS p ON p.groupid = pl.groupid
                       WHERE pl.shardid = get_shard_id_for_distribution_column('billing.accounts', %s)""", (str(user),))[0][0]
