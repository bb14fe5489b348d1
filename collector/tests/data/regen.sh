#!/bin/sh
# Regenerates the checked-in test certificates of collector/tests/grpc.rs
# (valid 100 years) with the code behind `ctw-collector certs`:
#   ca.pem, ca-key.pem            test CA ("ctw test CA")
#   collector.pem, -key.pem       server: DNS localhost, IP 127.0.0.1 and ::1
#   node-a.pem, node-b.pem, -key  clients (agents) of nodes node-a and node-b
#   other/ca.pem, other/node-a.pem  another CA and a node-a client it signed
# The test `checked_in_certificates` rewrites them when CTW_REGEN_TEST_CERTS=1
# and then checks them like every other run.
set -eu
root=$(cd "$(dirname "$0")/../../.." && pwd)
cd "$root"
CTW_REGEN_TEST_CERTS=1 cargo test -q -p ctw-collector --test grpc checked_in_certificates
