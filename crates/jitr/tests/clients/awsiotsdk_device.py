"""A device on AWS's Python IoT SDK (awsiotsdk, on awscrt) reaching AWS IoT with the variables
jitr delivers to balena: AWS_CERT and AWS_PRIVATE_KEY base64-decoded to PEM bytes, client id
RESIN_DEVICE_UUID, server CA file AWS_ROOT_CA_PATH, host AWS_DATA_ENDPOINT; the port is the
local endpoint's (TEST_PORT) instead of 8883.

It connects, retrying while the first connects are closed (the certificate still pending),
until DEADLINE_S; then publishes MESSAGE with QoS 1 to each TOPIC given, in order, stopping at
the first the broker does not acknowledge. One JSON line reports it all:
  {"connected": bool, "connect_attempts": n, "published": [{"topic": t, "acked": bool}], ...}
"""

import base64
import json
import os
import sys
import time

from awscrt import mqtt
from awsiot import mqtt_connection_builder


def connection(env):
    return mqtt_connection_builder.mtls_from_bytes(
        cert_bytes=base64.b64decode(env["AWS_CERT"]),
        pri_key_bytes=base64.b64decode(env["AWS_PRIVATE_KEY"]),
        endpoint=env["AWS_DATA_ENDPOINT"],
        # Without a port the SDK uses 443 with ALPN; AWS IoT's MQTT port is 8883.
        port=int(env["TEST_PORT"]),
        ca_filepath=env["AWS_ROOT_CA_PATH"],
        client_id=env["RESIN_DEVICE_UUID"],
        clean_session=True,
        keep_alive_secs=300,
        tcp_connect_timeout_ms=3000,
    )


def main():
    env = os.environ
    message, topics = sys.argv[1], sys.argv[2:]
    deadline = time.monotonic() + float(env.get("DEADLINE_S", "20"))
    report = {"connected": False, "connect_attempts": 0, "published": [], "errors": []}
    conn = None
    wait = 0.5
    while time.monotonic() < deadline:
        report["connect_attempts"] += 1
        conn = connection(env)
        try:
            conn.connect().result(timeout=10)
            report["connected"] = True
            break
        except Exception as e:  # the broker closed the connection: still pending
            report["errors"].append(f"{type(e).__name__}: {e}")
            time.sleep(wait)
            wait = min(wait * 2, 4.0)
    if report["connected"]:
        for topic in topics:
            future, _ = conn.publish(topic=topic, payload=message, qos=mqtt.QoS.AT_LEAST_ONCE)
            try:
                future.result(timeout=3)
                report["published"].append({"topic": topic, "acked": True})
            except Exception as e:
                report["published"].append({"topic": topic, "acked": False, "error": type(e).__name__})
                break
        try:
            conn.disconnect().result(timeout=3)
        except Exception:
            pass
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
