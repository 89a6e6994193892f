#!/usr/bin/env bash
# Quick start 1: open the studio on the demo project (installs what is missing first).
# Extra arguments go to `studio gui`, e.g. ./run.sh --project ~/my-project
source "$(dirname "$0")/scripts/bootstrap.sh"
cd "$ROOT"
# Qt's xcb plugin aborts without these system libraries; install them where we can.
if [ -z "${QT_QPA_PLATFORM:-}" ] && command -v apt-get >/dev/null && ! ldconfig -p | grep -q libxcb-cursor.so.0; then
    sudo_cmd=""; [ "$(id -u)" = 0 ] || sudo_cmd="sudo"
    $sudo_cmd apt-get install -y -q libxcb-cursor0 libxkbcommon-x11-0 libxcb-icccm4 libxcb-keysyms1 \
        libxcb-shape0 libegl1 libgl1 >/dev/null || echo "studio: could not install Qt's xcb libraries" >&2
fi
exec "$PY" -m studio gui --demo "$@"
