#!/bin/sh
# The image's entrypoint: give this container a name of its own, then become the command.
#
# Every copy says its name in its logs, on the page and in what it records (a session's
# `served_by`, a job's `worker`), and reads it from DYNO (or HONCHO_PROCESS_NAME, or PS).
# Our launcher, Heroku, honcho and foreman set it; Kubernetes does too (k8s/ passes the
# pod's name through the downward API), and then this script leaves it alone. Compose
# gives a container no replica number, but Docker sets HOSTNAME to the container's own
# id: the copy is named TYPE.HOSTNAME (web.3f2a1b9c0d1e), TYPE being the Procfile's name
# for the command it runs. Without this, four web containers would all say `web.1`.
#
# The type comes from the Procfile, not from a variable of its own, so that it cannot
# disagree with the command. A command that no Procfile line runs (router.py) is not
# named. `exec` replaces this shell: python becomes PID 1 and gets SIGTERM itself.
set -eu

if [ -z "${DYNO:-}" ]; then
    while IFS= read -r line; do
        case "$line" in
            *": $*") DYNO="${line%%:*}.$HOSTNAME"; export DYNO ;;
        esac
    done < Procfile
fi
exec "$@"
