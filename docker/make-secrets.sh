#!/bin/sh
# Creates the compose broker's logins, once: a random password for the worker in
# secrets/mqtt_password, and Mosquitto's hashed password file secrets/mosquitto_passwd.
# Run from docker/ (needs no Mosquitto on the host; the broker's image brings mosquitto_passwd):
#   docker run --rm -v "$PWD:/d" -w /d eclipse-mosquitto:2 sh make-secrets.sh
set -eu
dir=${1:-secrets}
if [ -e "$dir/mqtt_password" ] || [ -e "$dir/mosquitto_passwd" ]; then
    echo "$dir already holds the logins; add a camera with mosquitto_passwd instead (docs/running.md)" >&2
    exit 1
fi
mkdir -p "$dir"
umask 077
head -c 18 /dev/urandom | base64 > "$dir/mqtt_password"
mosquitto_passwd -c -b "$dir/mosquitto_passwd" emotion "$(cat "$dir/mqtt_password")"
if [ "$(id -u)" = 0 ]; then
    # The worker's image runs as uid 10001, Mosquitto's as uid 1883: each reads only its own file.
    chown 10001:10001 "$dir/mqtt_password"
    chown 1883:1883 "$dir/mosquitto_passwd"
fi
echo "created $dir/mqtt_password (the worker's) and $dir/mosquitto_passwd (the broker's), user 'emotion'"
