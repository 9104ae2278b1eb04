#!/usr/bin/env bash
# The issue-6 demo acceptance, by hand: 5 nodes, 50 blobs at 3 replicas; drain 2;
# SIGKILL one worker on each of the other 3; all through the CLI.
set -u
M=/work/main/target/release/meshos
D=$(mktemp -d)/demo
start=$(date +%s.%N)
$M demo --dir $D --nodes 5 --blobs 50 --blob-bytes 262144 > /tmp/accept.out 2>&1 &
DEMO=$!
c=$D/node-1/node.toml
t() { echo "$(echo "$(date +%s.%N) - $start" | bc | cut -c1-6) s: $*"; }
until [ -f $D/seeded ]; do sleep 0.2; done; t seeded
until $M status -o json --config $c 2>/dev/null | python3 -c "import json,sys; d=json.load(sys.stdin); sys.exit(0 if d['blobs']==50 and d['copies']==150 and d['copies_missing']==0 and d['daemons_running']==5 else 1)"; do sleep 0.5; done; t "50 blobs x 3 copies, 5 workers"
$M admin enter-maintenance node-2 --key $D/node-1/admin.key --config $c > /dev/null
$M admin enter-maintenance node-3 --key $D/node-1/admin.key --config $c > /dev/null; t "drain node-2 and node-3"
for n in 1 4 5; do kill -9 $(cut -d' ' -f1 $D/node-$n/daemons/worker/pid); done; t "kill -9 workers on node-1, node-4, node-5"
until $M status -o json --config $c 2>/dev/null | python3 -c "
import json,sys; d=json.load(sys.stdin); t={n['name']:n for n in d['node_table']}
ok = all(t[n]['maintenance']=='maintenance' and t[n]['copies']==0 for n in ('node-2','node-3')) and sum(n['copies'] for n in d['node_table'])==150 and d['copies_missing']==0 and all(t[n]['daemons_running']==1 for n in ('node-1','node-4','node-5'))
sys.exit(0 if ok else 1)"; do sleep 0.5; done; t "both drained to Maintenance, 150 copies on the other 3 nodes, workers back"
$M status --config $c | head -7
ls $D/node-2/blobs/*/ $D/node-3/blobs/*/ 2>/dev/null | grep -c '^[0-9a-f]\{64\}$'
kill -TERM $DEMO; wait $DEMO; t "stopped: $(tail -1 /tmp/accept.out)"
