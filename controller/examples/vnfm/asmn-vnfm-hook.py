#!/usr/bin/env python3
"""ASMN's VNFM hook: what an orchestrator's life-cycle step runs, over Sec-EM's REST API.

  onboard      at VNF package on-boarding: the SOL001 VNFD and the image's SHA-256 (of
               --image, or --sha256 when the orchestrator has the checksum already)
  instantiate  at LCM instantiate-start (OpenStack Tacker's mgmt driver, OSM's day-0
               config): creates the instance and writes its config drive (asmn/bundle
               mode 0600, asmn/agent.toml) and cloud-init user-data into --out; with
               --drive, also an ext4 image labelled cidata (mke2fs -d) to attach to the VM
  terminate    at LCM terminate-start: revokes the instance (its peers drop it)
  subscribe    registers a callback for Sec-EM's events; prints the signing secret once

Sec-EM is reached with an admin client certificate of the tenant's CA (the one asmnctl
uses): --ca, --cert, --key, or the files ca.pem, admin.pem, admin.key in --pki. Python's
standard library only. Exit status: 0 done, 1 Sec-EM refused (its problem document is
printed on stderr), 2 bad arguments or files.
"""

import argparse
import base64
import hashlib
import http.client
import json
import os
import socket
import ssl
import subprocess
import sys
import urllib.parse


class SecEm:
    """A client of Sec-EM's REST API (/v1) over mutual TLS."""

    def __init__(self, url, ca, cert, key, server_name=None, timeout=30):
        u = urllib.parse.urlsplit(url)
        if u.scheme != "https" or not u.hostname:
            raise ValueError(f"--sec-em: an https:// URL, not {url!r}")
        self.host, self.port = u.hostname, u.port or 7444
        self.server_name = server_name or u.hostname
        self.ctx = ssl.create_default_context(cafile=ca)
        self.ctx.load_cert_chain(cert, key)
        self.timeout = timeout

    def call(self, method, path, body=None, content_type="application/json"):
        raw = sock = None
        try:
            raw = socket.create_connection((self.host, self.port), timeout=self.timeout)
            sock = self.ctx.wrap_socket(raw, server_hostname=self.server_name)
            conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
            conn.sock = sock
            data = None
            headers = {"accept": "application/json"}
            if body is not None:
                data = json.dumps(body).encode() if content_type == "application/json" else body
                headers["content-type"] = content_type
            conn.request(method, path, body=data, headers=headers)
            r = conn.getresponse()
            text = r.read()
            parsed = json.loads(text) if text else None
            if r.status >= 300:
                raise Refused(r.status, parsed)
            return parsed
        finally:
            if sock is not None:
                sock.close()
            elif raw is not None:
                raw.close()


class Refused(Exception):
    def __init__(self, status, problem):
        super().__init__(f"Sec-EM answered {status}")
        self.status, self.problem = status, problem


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest(), os.path.getsize(path)


def write_private(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def onboard(api, a):
    with open(a.sol001, "rb") as f:
        descriptor = f.read().decode()
    if a.image:
        digest, size = sha256_of(a.image)
    elif a.sha256:
        digest, size = a.sha256.lower(), None
    else:
        raise ValueError("onboard: give --image or --sha256")
    req = {"descriptor": descriptor, "digests": {"sha256": digest}}
    if size is not None:
        req["image_bytes"] = size
    return api.call("POST", "/v1/vnf-packages", req)


def instantiate(api, a):
    req = {"tenant": a.tenant, "vnf": a.vnf}
    if a.name:
        req["name"] = a.name
    if a.gateway:
        req["role"] = "gateway"
    if a.underlay:
        agent = {"target": a.target, "underlay": a.underlay}
        if a.state_dir:
            agent["state_dir"] = a.state_dir
        if a.metrics_addr:
            agent["metrics_addr"] = a.metrics_addr
        req["agent"] = agent
    created = api.call("POST", "/v1/instances", req)
    os.makedirs(a.out, exist_ok=True)
    for rel, b64 in created["config_drive"].items():
        path = os.path.join(a.out, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_private(path, base64.b64decode(b64))
    write_private(os.path.join(a.out, "user-data"), created["user_data"].encode())
    if a.drive:
        # A config drive the agent package's asmn-bundle unit finds by its label.
        with open(a.drive, "wb") as f:
            f.truncate(8 << 20)
        subprocess.run(
            ["mke2fs", "-q", "-F", "-t", "ext4", "-L", "cidata", "-d", a.out, a.drive],
            check=True,
        )
    inst = created["instance"]
    return {"id": inst["id"], "name": inst["name"], "overlay": inst["overlay"], "drive": a.out}


def terminate(api, a):
    return api.call("POST", f"/v1/instances/{a.id}/revoke", {"reason": a.reason})


def subscribe(api, a):
    req = {"callback": a.callback}
    if a.types:
        req["types"] = a.types.split(",")
    return api.call("POST", "/v1/subscriptions", req)


def main(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sec-em", required=True, help="Sec-EM's REST API, https://HOST:PORT (rest_addr)")
    p.add_argument("--server-name", help="the name in Sec-EM's certificate, if not the URL's host")
    p.add_argument("--pki", help="a directory with ca.pem, admin.pem, admin.key (sec-em init)")
    p.add_argument("--ca")
    p.add_argument("--cert")
    p.add_argument("--key")
    sub = p.add_subparsers(dest="command", required=True)
    o = sub.add_parser("onboard", help="on-board a VNF from its SOL001 VNFD")
    o.add_argument("--sol001", required=True, help="the VNFD (TOSCA YAML)")
    o.add_argument("--image", help="the image file (its SHA-256 is computed here)")
    o.add_argument("--sha256", help="the image's SHA-256, when the image is elsewhere")
    i = sub.add_parser("instantiate", help="create an instance and write its config drive")
    i.add_argument("--tenant", required=True)
    i.add_argument("--vnf", required=True)
    i.add_argument("--name", help="the instance's name (Sec-EM picks one when absent)")
    i.add_argument("--gateway", action="store_true", help="the tenant's VNF-G/W")
    i.add_argument("--target", default="/dev/vda", help="what the agent measures in the VM")
    i.add_argument("--underlay", help="the agent's WireGuard address in the VM, ip:port")
    i.add_argument("--state-dir", help="the agent's state directory in the VM")
    i.add_argument("--metrics-addr", help="where the agent serves metrics, ip:port")
    i.add_argument("--out", required=True, help="directory for the config drive's files")
    i.add_argument("--drive", help="also write an ext4 config drive image (label cidata)")
    t = sub.add_parser("terminate", help="revoke an instance")
    t.add_argument("--id", required=True)
    t.add_argument("--reason", default="terminated by the VNFM")
    s = sub.add_parser("subscribe", help="register a callback for Sec-EM's events")
    s.add_argument("--callback", required=True)
    s.add_argument("--types", help="comma-separated event types (all when absent)")
    a = p.parse_args(argv)
    pki = a.pki or "."
    ca = a.ca or os.path.join(pki, "ca.pem")
    cert = a.cert or os.path.join(pki, "admin.pem")
    key = a.key or os.path.join(pki, "admin.key")
    try:
        api = SecEm(a.sec_em, ca, cert, key, a.server_name)
        out = {"onboard": onboard, "instantiate": instantiate, "terminate": terminate, "subscribe": subscribe}[
            a.command
        ](api, a)
    except Refused as e:
        print(f"asmn-vnfm-hook: {a.command}: Sec-EM answered {e.status}: {json.dumps(e.problem)}", file=sys.stderr)
        return 1
    except (OSError, ValueError, ssl.SSLError, subprocess.CalledProcessError) as e:
        print(f"asmn-vnfm-hook: {a.command}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
