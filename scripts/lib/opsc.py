"""What the Python scripts of this repository share (standard library only): loopback ports,
plain HTTP probes, waiting for a condition, and a client for the Kubernetes API that
authenticates with client certificates.

A script imports it with
    sys.path.insert(0, str(Path(__file__).resolve().parent / "lib"))
    import opsc
"""

import base64
import http.client
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import urllib.parse


def free_ports(n):
    """n distinct free TCP ports on 127.0.0.1 (all bound at once, then released)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port():
    return free_ports(1)[0]


def listening(port, host="127.0.0.1"):
    """Something accepts TCP connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


def http_get(addr, path, timeout=5):
    """The body of GET http://addr/path when it answers 200, else None."""
    try:
        c = http.client.HTTPConnection(addr, timeout=timeout)
        c.request("GET", path)
        r = c.getresponse()
        body = r.read().decode()
        return body if r.status == 200 else None
    except OSError:
        return None
    except http.client.HTTPException:
        return None


def wait_until(what, check, timeout, interval=0.25, error=TimeoutError):
    """Calls check() until it returns something truthy and returns that; raises error(message)
    after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise error(f"{what}: not done after {timeout} s")
        time.sleep(interval)


class KubeApi:
    """The Kubernetes API over HTTPS with a client certificate: one kept-alive connection per
    thread, a request retried twice when the connection fails (not when the server answers)."""

    def __init__(self, server, ca_file, cert_file, key_file, timeout=60):
        url = urllib.parse.urlsplit(server)
        self.host, self.port = url.hostname, url.port or 443
        self.ctx = ssl.create_default_context(cafile=str(ca_file))
        self.ctx.load_cert_chain(str(cert_file), str(key_file))
        self.timeout = timeout
        self.local = threading.local()

    @classmethod
    def from_state(cls, state):
        """The admin of a control plane of scripts/controlplane (its state directory)."""
        ports = dict(l.strip().split("=", 1) for l in open(f"{state}/ports.env") if "=" in l)
        pki = f"{state}/pki"
        return cls(f"https://127.0.0.1:{ports['APISERVER_PORT']}", f"{pki}/ca.crt",
                   f"{pki}/admin.crt", f"{pki}/admin.key")

    @classmethod
    def from_kubeconfig(cls, kubectl, kubeconfig, cred_dir, timeout=60):
        """The current context of a kubeconfig with embedded certificates; the CA, certificate
        and key are written to cred_dir (mode 0600)."""
        raw = json.loads(subprocess.run(
            [str(kubectl), "--kubeconfig", str(kubeconfig), "config", "view", "--raw", "--minify",
             "-o", "json"], check=True, text=True, stdout=subprocess.PIPE).stdout)
        cluster, user = raw["clusters"][0]["cluster"], raw["users"][0]["user"]
        os.makedirs(cred_dir, mode=0o700, exist_ok=True)
        files = {}
        for key, field in [("ca", cluster["certificate-authority-data"]),
                           ("crt", user["client-certificate-data"]),
                           ("key", user["client-key-data"])]:
            path = os.path.join(str(cred_dir), f"admin.{key}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(base64.b64decode(field))
            files[key] = path
        return cls(cluster["server"], files["ca"], files["crt"], files["key"], timeout=timeout)

    def _conn(self):
        c = getattr(self.local, "conn", None)
        if c is None:
            c = http.client.HTTPSConnection(self.host, self.port, context=self.ctx,
                                            timeout=self.timeout)
            self.local.conn = c
        return c

    def request(self, method, path, body=None, ctype="application/json",
                accept="application/json"):
        """(status, payload): the decoded JSON, or the text when it is not JSON."""
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        headers = {"Accept": accept}
        if data is not None:
            headers["Content-Type"] = ctype
        for attempt in range(3):
            c = self._conn()
            try:
                c.request(method, path, body=data, headers=headers)
                r = c.getresponse()
                raw = r.read()
                try:
                    payload = json.loads(raw) if raw else None
                except ValueError:
                    payload = raw.decode(errors="replace")
                return r.status, payload
            except (http.client.HTTPException, OSError):
                c.close()
                self.local.conn = None
                if attempt == 2:
                    raise
                time.sleep(0.5)

    def get(self, path):
        """The object at path, or None when there is none; any other failure raises."""
        status, payload = self.request("GET", path)
        if status == 404:
            return None
        if status >= 400:
            raise RuntimeError(f"GET {path}: {status} {payload}")
        return payload

    def apply(self, path, obj, manager, force=True):
        """Server-side apply of obj at path as field manager `manager`."""
        q = f"?fieldManager={manager}" + ("&force=true" if force else "")
        return self.request("PATCH", path + q, obj, ctype="application/apply-patch+yaml")

    def merge(self, path, patch):
        return self.request("PATCH", path, patch, ctype="application/merge-patch+json")
