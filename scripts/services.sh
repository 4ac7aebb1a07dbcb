#!/usr/bin/env bash
# Throwaway class services for tests, CI and benchmarks/class_load.py: a PostgreSQL cluster in a
# temp dir (127.0.0.1, random free port, scram password auth, databases mlflow, mlflow_auth and
# optuna) and the README's `mlflow server --app-name basic-auth` on it. Installs nothing.
#
#   scripts/services.sh start     # prints the env file's path
#   eval "$(scripts/services.sh env)"
#   scripts/services.sh stop      # stops both (by the recorded PIDs) and deletes the temp dir
#
# Passwords live only in 0600 files (PGPASSFILE, the auth ini, the env file), never on a
# command line that `ps` shows. DEEP_REPRO_SERVICES_DIR picks the directory.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${DEEP_REPRO_SERVICES_DIR:-${TMPDIR:-/tmp}/deep-repro-services-$(id -u)}
ENV_FILE=$DIR/env
START_TIMEOUT=${DEEP_REPRO_SERVICES_TIMEOUT:-300}
WORKERS=${DEEP_REPRO_SERVICES_WORKERS:-2}

die() { echo "services.sh: $*" >&2; exit 1; }

# PostgreSQL refuses to run as root: run the server binaries as `postgres` then.
as_pg() {
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

pg_bin() {
  local initdb
  initdb=$(command -v initdb 2>/dev/null || true)
  if [ -z "$initdb" ]; then
    initdb=$(ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V | tail -n 1 || true)
  fi
  [ -n "$initdb" ] || die "PostgreSQL not found (initdb); install it (apt-get install -y postgresql)"
  dirname "$(readlink -f "$initdb")"  # psql, pg_ctl sit next to the real initdb
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

secret() { python3 -c 'import secrets; print(secrets.token_hex(16))'; }

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for DESCRIPTION COMMAND...: poll once a second, at most START_TIMEOUT times
  local what=$1 i
  shift
  for ((i = 0; i < START_TIMEOUT; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  die "$what did not come up within ${START_TIMEOUT}s (logs in $DIR)"
}

start() {
  if alive "$DIR/mlflow.pid" && alive "$DIR/postgres.pid"; then
    echo "$ENV_FILE"
    return 0
  fi
  [ ! -e "$DIR" ] || stop >/dev/null
  local bin pg_port ml_port su_pw pw study_pw admin_pw flask_key mlflow_bin
  bin=$(pg_bin)
  mlflow_bin=$(cd "$ROOT" && uv run --no-sync python -c \
    'import shutil, sys; print(shutil.which("mlflow") or sys.exit("mlflow not installed"))')
  trap 'stop >/dev/null 2>&1' EXIT  # a failed start leaves nothing running
  umask 077
  mkdir -p "$DIR/pg" "$DIR/artifacts"
  chmod 711 "$DIR"  # the postgres user must reach $DIR/pg
  [ "$(id -u)" != 0 ] || chown postgres: "$DIR/pg"
  pg_port=$(free_port)
  ml_port=$(free_port)
  su_pw=$(secret)
  pw=$(secret)
  study_pw=$(secret)
  admin_pw=$(secret)
  flask_key=$(secret)

  # The superuser's password reaches initdb through a file the postgres user can read.
  printf '%s\n' "$su_pw" >"$DIR/pg/superuser.pw"
  [ "$(id -u)" != 0 ] || chown postgres: "$DIR/pg/superuser.pw"
  as_pg "$bin/initdb" -D "$DIR/pg/data" -U postgres --pwfile="$DIR/pg/superuser.pw" \
    --auth=scram-sha-256 -E UTF8 --no-instructions >"$DIR/pg/initdb.log" 2>&1 \
    || die "initdb failed: $(tail -n 3 "$DIR/pg/initdb.log")"
  rm -f "$DIR/pg/superuser.pw"
  as_pg "$bin/pg_ctl" -D "$DIR/pg/data" -l "$DIR/pg/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $pg_port -c unix_socket_directories=$DIR/pg/data \
        -c max_connections=300" start >/dev/null \
    || die "PostgreSQL did not start: $(tail -n 5 "$DIR/pg/server.log")"
  as_pg head -n 1 "$DIR/pg/data/postmaster.pid" >"$DIR/postgres.pid"

  # libpq reads passwords from PGPASSFILE: the MLflow server and psql get them from there.
  printf '127.0.0.1:%s:*:postgres:%s\n127.0.0.1:%s:*:mlflow_server:%s\n' \
    "$pg_port" "$su_pw" "$pg_port" "$pw" >"$DIR/pgpass"
  chmod 600 "$DIR/pgpass"
  PGPASSFILE=$DIR/pgpass "$bin/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$pg_port" \
    -U postgres -d postgres >/dev/null <<SQL || die "creating the databases failed"
-- Least privilege: the MLflow server's login owns the tracking and accounts databases; the
-- login students get for shared Optuna studies owns the study database and nothing else.
CREATE ROLE mlflow_server LOGIN PASSWORD '$pw';
CREATE ROLE class_studies LOGIN PASSWORD '$study_pw';
CREATE DATABASE mlflow OWNER mlflow_server;
CREATE DATABASE mlflow_auth OWNER mlflow_server;
CREATE DATABASE optuna OWNER class_studies;
REVOKE ALL ON DATABASE mlflow, mlflow_auth, optuna FROM PUBLIC;
SQL

  cat >"$DIR/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = postgresql://mlflow_server@127.0.0.1:$pg_port/mlflow_auth
admin_username = admin
admin_password = $admin_pw
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
# Without this cache every request re-checks the PBKDF2 hash (~0.5 s of CPU).
auth_cache_ttl_seconds = 60
INI
  # setsid: the server and its workers form one process group that `stop` ends together.
  # No job runner (GenAI jobs; 7 idle processes). A generous worker health-check timeout: on a
  # loaded CI machine a worker still importing after uvicorn's 5 s is killed and respawned.
  (cd "$DIR" && PGPASSFILE=$DIR/pgpass MLFLOW_AUTH_CONFIG_PATH=$DIR/basic_auth.ini \
    MLFLOW_FLASK_SERVER_SECRET_KEY=$flask_key MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
    exec setsid "$mlflow_bin" server \
    --app-name basic-auth --host 127.0.0.1 --port "$ml_port" --workers "$WORKERS" \
    --uvicorn-opts "--timeout-worker-healthcheck 120" \
    --backend-store-uri "postgresql://mlflow_server@127.0.0.1:$pg_port/mlflow" \
    --artifacts-destination "$DIR/artifacts" \
    --allowed-hosts "localhost:$ml_port,127.0.0.1:$ml_port,$(hostname):$ml_port" \
    >"$DIR/mlflow.log" 2>&1 </dev/null) &
  echo $! >"$DIR/mlflow.pid"
  wait_for "mlflow server" python3 -c "import urllib.request as u; \
u.urlopen('http://127.0.0.1:$ml_port/health', timeout=5)"

  cat >"$ENV_FILE" <<ENV
DEEP_REPRO_SERVICES_DIR=$DIR
DEEP_REPRO_TEST_PG_URL=postgresql://class_studies:$study_pw@127.0.0.1:$pg_port/optuna
DEEP_REPRO_TEST_PG_SERVER_URL=postgresql://mlflow_server:$pw@127.0.0.1:$pg_port/mlflow
DEEP_REPRO_TEST_MLFLOW_URL=http://localhost:$ml_port
DEEP_REPRO_TEST_MLFLOW_ADMIN_USER=admin
DEEP_REPRO_TEST_MLFLOW_ADMIN_PASSWORD=$admin_pw
ENV
  trap - EXIT
  echo "$ENV_FILE"
}

stop() {
  local pid i
  if [ -f "$DIR/mlflow.pid" ]; then
    pid=$(cat "$DIR/mlflow.pid")
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 30; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  if [ -f "$DIR/pg/data/postmaster.pid" ] || [ -f "$DIR/postgres.pid" ]; then
    as_pg "$(pg_bin)/pg_ctl" -D "$DIR/pg/data" -m fast -w -t 60 stop >/dev/null 2>&1 || true
  fi
  rm -rf "$DIR"
}

env_() {
  [ -f "$ENV_FILE" ] || die "services not started (no $ENV_FILE): run scripts/services.sh start"
  sed 's/^/export /' "$ENV_FILE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) env_ ;;
  *) die "usage: scripts/services.sh start|stop|env" ;;
esac
