#!/usr/bin/env bash
# `make run`: set up everything on this machine and run Koerier in the foreground.
#
# Installs and starts PostgreSQL and RabbitMQ (Debian packages), creates the database, the
# broker vhost and their users, writes ./koerier.env (which every later `.venv/bin/koerier`
# in this folder reads), migrates, creates a demo client, a demo kanaal and a demo
# subscriber, then serves the API on 127.0.0.1:8000 with one delivery worker until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."

ADDRESS=${KOERIER_ADDRESS:-127.0.0.1}
PORT=${KOERIER_PORT:-8000}
SUBSCRIBER_PORT=${KOERIER_DEMO_SUBSCRIBER_PORT:-8001}
ENV_FILE=koerier.env

if [ "$(id -u)" -ne 0 ]; then
  echo "make run installs Debian packages and creates database users: run it as root." >&2
  exit 1
fi

bash scripts/services.sh
bash scripts/venv.sh

if [ ! -s "$ENV_FILE" ]; then
  echo "==> writing $ENV_FILE (development settings, fresh passwords)"
  umask 077
  secret() { python3 -c 'import secrets; print(secrets.token_urlsafe(24))'; }
  cat > "$ENV_FILE" <<EOF
# Written by \`make run\`. Every .venv/bin/koerier started in this folder reads this file.
KOERIER_ENVIRONMENT=development
KOERIER_DB_HOST=127.0.0.1
KOERIER_DB_PORT=5432
KOERIER_DB_NAME=koerier
KOERIER_DB_USER=koerier
KOERIER_DB_PASSWORD=$(secret)
KOERIER_BROKER_HOST=127.0.0.1
KOERIER_BROKER_PORT=5672
KOERIER_BROKER_VHOST=koerier
KOERIER_BROKER_USER=koerier
KOERIER_BROKER_PASSWORD=$(secret)
KOERIER_SECRET_KEY=$(secret)
KOERIER_PUBLIC_URL=http://$ADDRESS:$PORT
KOERIER_LOG_FORMAT=console
# The demo subscriber runs on this machine; production keeps this list short.
KOERIER_PROBE_UNAUTHENTICATED_HOSTS=127.0.0.1,localhost
EOF
  umask 022
fi
value() { grep -E "^$1=" "$ENV_FILE" | tail -n 1 | cut -d= -f2-; }
DB_PASSWORD=$(value KOERIER_DB_PASSWORD)
BROKER_PASSWORD=$(value KOERIER_BROKER_PASSWORD)

echo "==> ensuring the PostgreSQL role and database 'koerier'"
psql_admin() { runuser -u postgres -- psql -q -v ON_ERROR_STOP=1 "$@"; }
if [ -z "$(psql_admin -tAc "SELECT 1 FROM pg_roles WHERE rolname = 'koerier'")" ]; then
  psql_admin -c "CREATE ROLE koerier LOGIN"
fi
psql_admin -v pw="$DB_PASSWORD" <<'SQL'
ALTER ROLE koerier PASSWORD :'pw';
SQL
if [ -z "$(psql_admin -tAc "SELECT 1 FROM pg_database WHERE datname = 'koerier'")" ]; then
  psql_admin -c "CREATE DATABASE koerier OWNER koerier"
fi

echo "==> ensuring the RabbitMQ vhost and user 'koerier'"
rabbitmqctl -q list_vhosts | grep -qx koerier || rabbitmqctl -q add_vhost koerier
if rabbitmqctl -q list_users | awk '{print $1}' | grep -qx koerier; then
  rabbitmqctl -q change_password koerier "$BROKER_PASSWORD" >/dev/null
else
  rabbitmqctl -q add_user koerier "$BROKER_PASSWORD" >/dev/null
fi
rabbitmqctl -q set_permissions -p koerier koerier '.*' '.*' '.*'

KOERIER=.venv/bin/koerier
$KOERIER migrate
if ! $KOERIER check >/dev/null; then
  # check has said on stderr what is wrong: most often a koerier.env written anew, whose
  # secret key does not open the credentials stored with the old one.
  echo "make run stops here: fix the problem above (koerier check) and run it again." >&2
  exit 1
fi

mkdir -p .run
if [ ! -s .run/demo-secret ]; then
  python3 -c 'import secrets; print(secrets.token_urlsafe(32))' > .run/demo-secret
fi
DEMO_SECRET=$(cat .run/demo-secret)
if ! $KOERIER client list | grep -qw demo; then
  $KOERIER client add demo --secret "$DEMO_SECRET" --all >/dev/null
fi

# A second `make run` (or anything else on these ports) would otherwise print the banner
# for an API it did not start.
for port in "$PORT" "$SUBSCRIBER_PORT"; do
  if (exec 3<>"/dev/tcp/$ADDRESS/$port") 2>/dev/null; then
    echo "make run stops here: something already listens on $ADDRESS:$port" \
      "(another make run?). Stop it, or set KOERIER_PORT / KOERIER_DEMO_SUBSCRIBER_PORT." >&2
    exit 1
  fi
done

pids=()
stop() {
  trap - INT TERM EXIT
  echo
  echo "==> stopping Koerier"
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT
trap 'stop; exit 130' INT TERM

.venv/bin/python scripts/demo_subscriber.py --port "$SUBSCRIBER_PORT" \
  --auth "Bearer demo-subscriber-token" &
pids+=($!)
$KOERIER worker --processes 1 &
pids+=($!)
$KOERIER serve --address "$ADDRESS" --port "$PORT" &
pids+=($!)

for _ in $(seq 1 100); do
  curl -fs "http://$ADDRESS:$PORT/healthz" >/dev/null && break
  sleep 0.2
done

API="http://$ADDRESS:$PORT/api/v1"
TOKEN=$($KOERIER token demo)
auth=(-H "Authorization: Bearer $TOKEN" -H "Content-Type: application/json")
curl -fs "${auth[@]}" "$API/kanaal?naam=demo" | grep -q '"naam"' || curl -fs "${auth[@]}" \
  -d '{"naam": "demo", "documentatieLink": "https://example.org/demo", "filters": ["bron"]}' \
  "$API/kanaal" >/dev/null
SUBSCRIBER="http://127.0.0.1:$SUBSCRIBER_PORT/notifications"
curl -fs "${auth[@]}" "$API/abonnement" | grep -q "$SUBSCRIBER" || curl -fs "${auth[@]}" \
  -d "{\"callbackUrl\": \"$SUBSCRIBER\", \"auth\": \"Bearer demo-subscriber-token\",
       \"kanalen\": [{\"naam\": \"demo\", \"filters\": {\"bron\": \"*\"}}]}" \
  "$API/abonnement" >/dev/null

cat <<EOF

Koerier is running on http://$ADDRESS:$PORT (API under /api/v1), with one delivery worker
and a demo subscriber on port $SUBSCRIBER_PORT that prints what it receives.

  client id:  demo
  secret:     $DEMO_SECRET
  token:      $TOKEN
              (valid for an hour; a new one: .venv/bin/koerier token demo)

Publish a notification to the kanaal 'demo' from another shell:

  curl -s -X POST $API/notificaties \\
    -H "Authorization: Bearer \$(.venv/bin/koerier token demo)" \\
    -H "Content-Type: application/json" \\
    -d '{"kanaal": "demo", "hoofdObject": "https://zaken.example/api/v1/zaken/1",
         "resource": "zaak", "resourceUrl": "https://zaken.example/api/v1/zaken/1",
         "actie": "create", "aanmaakdatum": "'\$(date -u +%FT%TZ)'",
         "kenmerken": {"bron": "demo"}}'

The demo subscriber prints it here; the record: .venv/bin/koerier notifications show UUID
Press Ctrl-C to stop.
EOF
# Nothing here restarts a process that dies: say which one went, then stop the others.
status=0
wait -n -p gone "${pids[@]}" || status=$?
declare -A names=([${pids[0]}]="the demo subscriber" [${pids[1]}]="koerier worker"
                  [${pids[2]}]="koerier serve")
echo "==> ${names[$gone]:-a process} exited (status $status). Nothing accepted is lost:" \
  "make run starts again where it left off." >&2
exit "$status"
