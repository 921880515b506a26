#!/usr/bin/env bash
# A local Comzy cluster on loopback: nats-server with JetStream, 2 control nodes and 2 edges.
#
#   examples/cluster/run.sh            # Ctrl-C (or SIGTERM) stops all five processes
#
# Put nginx.conf (this folder) in front of it for TLS, the wildcard host and the agents' WebSocket.
# Every port and path below can be overridden from the environment; tests/test_examples_cluster.py
# runs this script as written with free ports. Needs nats-server (Debian: apt-get install
# nats-server) and comzy with the nats extra (pip install 'comzy[nats]').
set -euo pipefail

NATS_SERVER=${NATS_SERVER:-nats-server}
COMZY_SERVER=${COMZY_SERVER:-comzy-server}
STATE_DIR=${STATE_DIR:-./cluster-data}          # NATS's JetStream store, the nodes' data and logs
NATS_PORT=${NATS_PORT:-4223}                     # not 4222: leave a NATS already on this machine alone
CONTROL1_PORT=${CONTROL1_PORT:-8191}             # agent WebSocket of control node 1 ...
CONTROL2_PORT=${CONTROL2_PORT:-8291}             # ... and 2 (nginx's upstream comzy_control)
EDGE1_PORT=${EDGE1_PORT:-8190}                   # public HTTP of edge 1 ...
EDGE2_PORT=${EDGE2_PORT:-8290}                   # ... and 2 (nginx's upstream comzy_edges)
CONTROL1_ADMIN=${CONTROL1_ADMIN:-8193}
CONTROL2_ADMIN=${CONTROL2_ADMIN:-8293}
EDGE1_ADMIN=${EDGE1_ADMIN:-8192}
EDGE2_ADMIN=${EDGE2_ADMIN:-8292}
BASE_DOMAIN=${BASE_DOMAIN:-example.com}
READY_TIMEOUT=${READY_TIMEOUT:-30}               # seconds each process may take to say it is ready

# What every node shares. Agents and visitors come through nginx, which is trusted to name the client.
export COMZY_CLUSTER_NAME=${COMZY_CLUSTER_NAME:-example}
export COMZY_NATS_URL="nats://127.0.0.1:${NATS_PORT}"
export COMZY_HOST=127.0.0.1
export COMZY_BASE_DOMAIN="${BASE_DOMAIN}"
export COMZY_PUBLIC_URL="${COMZY_PUBLIC_URL:-https://{alias\}.${BASE_DOMAIN}}"
export COMZY_PUBLIC_AGENT_URL="${COMZY_PUBLIC_AGENT_URL:-wss://${BASE_DOMAIN}}"
export COMZY_TRUSTED_PROXIES="${COMZY_TRUSTED_PROXIES:-127.0.0.1/32}"
# One SQLite file in one data directory, shared by the four nodes: fine on one machine only.
# A cluster on several machines needs PostgreSQL or MySQL (COMZY_DATABASE_URL, docs/deploy.md).
export COMZY_DATA_DIR="${COMZY_DATA_DIR:-${STATE_DIR}/data}"

mkdir -p "${STATE_DIR}"
mkdir -p -m 700 "${COMZY_DATA_DIR}"  # it holds token hashes and the admin token
pids=()

stop() {
    trap - EXIT INT TERM
    # Nodes first (newest first: edges, then control nodes), nats-server last; each by its own PID.
    local index
    for ((index = ${#pids[@]} - 1; index >= 0; index--)); do
        kill -TERM "${pids[index]}" 2>/dev/null || true
        wait "${pids[index]}" 2>/dev/null || true
    done
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Wait until LOG has a line matching PATTERN; fail if process PID ends or READY_TIMEOUT passes.
wait_for() {
    local name=$1 pid=$2 log=$3 pattern=$4 deadline=$((SECONDS + READY_TIMEOUT))
    until grep -qE "${pattern}" "${log}" 2>/dev/null; do
        if ! kill -0 "${pid}" 2>/dev/null; then
            echo "run.sh: ${name} exited before it was ready; its log (${log}):" >&2
            tail -n 20 "${log}" >&2
            exit 1
        fi
        if ((SECONDS >= deadline)); then
            echo "run.sh: ${name} was not ready within ${READY_TIMEOUT} s; see ${log}" >&2
            exit 1
        fi
        sleep 0.1
    done
}

"${NATS_SERVER}" -a 127.0.0.1 -p "${NATS_PORT}" -js -sd "${STATE_DIR}/nats" >"${STATE_DIR}/nats.log" 2>&1 &
pids+=($!)
wait_for nats-server "$!" "${STATE_DIR}/nats.log" "Server is ready"
echo "nats-server   nats://127.0.0.1:${NATS_PORT} (JetStream in ${STATE_DIR}/nats)"

# node NAME ROLE PORT ADMIN: one comzy-server; a control node's PORT is its agent listener, an edge's its public one.
node() {
    local name=$1 role=$2 port=$3 admin=$4 log="${STATE_DIR}/$1.log" ws=0 http=0
    if [[ ${role} == control ]]; then ws=${port}; else http=${port}; fi
    env COMZY_ROLE="${role}" COMZY_NODE_NAME="${name}" COMZY_ADMIN_PORT="${admin}" \
        COMZY_WS_PORT="${ws}" COMZY_HTTP_PORT="${http}" "${COMZY_SERVER}" >"${log}" 2>&1 &
    pids+=($!)
    wait_for "${name}" "$!" "${log}" "ready as ${role} node"
    echo "${name}  $([[ ${role} == control ]] && echo "agents ws://127.0.0.1:${port}" || echo "public http://127.0.0.1:${port}")  admin http://127.0.0.1:${admin}  log ${log}"
}

# One at a time: the first node creates the database and the admin token the others then share.
node control1 control "${CONTROL1_PORT}" "${CONTROL1_ADMIN}"
node control2 control "${CONTROL2_PORT}" "${CONTROL2_ADMIN}"
node edge1 edge "${EDGE1_PORT}" "${EDGE1_ADMIN}"
node edge2 edge "${EDGE2_PORT}" "${EDGE2_ADMIN}"
echo "cluster ready: agents connect to ${COMZY_PUBLIC_AGENT_URL}, visitors open ${COMZY_PUBLIC_URL} (through nginx)"

# Until a signal, or until any process ends (then the rest are stopped too).
wait -n "${pids[@]}"
echo "run.sh: a process ended; stopping the others" >&2
exit 1
