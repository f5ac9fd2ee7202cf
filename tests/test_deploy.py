"""
The deployment files in etc/: the systemd units name the directives a
production unit needs and options the plugin takes; the nginx site passes
``nginx -t``; and two Cyphr processes behind that nginx serve REST and
Socket.IO (polling upgraded to WebSocket) end to end.
"""

from __future__ import annotations

import http.client as httplib
import os
import re
import shlex
import shutil
import signal
import ssl
import subprocess
from typing import Any

import requests
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from cyphr.config import Config, parse_duration
from cyphr.tap import Options
from tests import postgres
from tests.certificates import self_signed
from tests.processes import REPO, CyphrProcess, UrllibHTTP, clean_environment, free_port
from tests.realtime import SioClient, sleep, until
from tests.users import User

ETC = os.path.join(REPO, "etc")
SITE = os.path.join(ETC, "nginx", "cyphr.conf")


def read_unit(path: str) -> dict[str, dict[str, list[str]]]:
    """A systemd unit file as {section: {key: [values in order]}}."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    with open(path, encoding="utf-8") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1], {})
                continue
            assert current is not None and "=" in line, f"{path}:{number}: not key=value: {line!r}"
            key, value = line.split("=", 1)
            current.setdefault(key.strip(), []).append(value.strip())
    return sections


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if found is None:
        raise AssertionError("nginx is not installed: apt-get install nginx-light (.ci/run does)")
    return found


def nginx_main_config(directory: str, site: str) -> str:
    """A main nginx.conf keeping everything (pid, logs, temp files) in
    ``directory`` and including ``site`` in its http block."""
    paths = {name: os.path.join(directory, name) for name in
             ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")}
    for path in paths.values():
        os.makedirs(path, exist_ok=True)
    main = os.path.join(directory, "nginx.conf")
    with open(main, "w") as f:
        f.write(f"""
{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {paths["client_body"]};
    proxy_temp_path {paths["proxy"]};
    fastcgi_temp_path {paths["fastcgi"]};
    uwsgi_temp_path {paths["uwsgi"]};
    scgi_temp_path {paths["scgi"]};
    include {site};
}}
""")
    return main


def site_for_test(directory: str, replacements: dict[str, str]) -> str:
    """The shipped site with ``replacements`` made (each must match)."""
    with open(SITE, encoding="utf-8") as f:
        text = f.read()
    for old, new in replacements.items():
        assert old in text, f"{old!r} is not in {SITE}"
        text = text.replace(old, new)
    path = os.path.join(directory, "cyphr.conf")
    with open(path, "w") as f:
        f.write(text)
    return path


class SystemdUnitTests(TestCase):
    REQUIRED = {
        "Restart": "always",
        "NoNewPrivileges": "true",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
        "PrivateDevices": "true",
        "ProtectKernelTunables": "true",
        "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
        "LockPersonality": "true",
        "StateDirectory": "cyphr",
        "LimitNOFILE": "65536",
        "KillSignal": "SIGTERM",
        "User": "cyphr",
    }

    def check_unit(self, name: str) -> list[str]:
        unit = read_unit(os.path.join(ETC, "systemd", name))
        self.assertEqual(set(unit), {"Unit", "Service", "Install"})
        service = unit["Service"]
        for key, value in self.REQUIRED.items():
            self.assertEqual(service.get(key), [value], f"{name}: {key}")
        self.assertIn("RestartSec", service)
        self.assertEqual(service["Environment"], ["CYPHR_DATA_DIR=%S/cyphr"])
        # systemd must wait longer than the server's own bound on its stop.
        self.assertGreater(parse_duration(service["TimeoutStopSec"][0]), Config().shutdown_timeout)
        [exec_start] = service["ExecStart"]
        argv = shlex.split(exec_start)
        self.assertTrue(argv[0].endswith("/twistd"), argv)
        self.assertEqual(argv[1:6], ["-n", "--pidfile=", "cyphr", "--config", "/etc/cyphr/cyphr.toml"])
        return argv[4:]

    def parse(self, args: list[str]) -> Config:
        """The plugin's own parsing of the unit's arguments, with the example
        configuration file in place of /etc/cyphr/cyphr.toml."""
        example = os.path.join(ETC, "cyphr.example.toml")
        options = Options()
        options.environ = {"CYPHR_DATA_DIR": "/var/lib/cyphr"}
        options.parseOptions([example if a == "/etc/cyphr/cyphr.toml" else a for a in args])
        return options.config

    def test_single_unit(self) -> None:
        """cyphr.service runs twistd in the foreground without a pid file,
        hardened, with its state directory as the data directory; the
        plugin accepts its arguments."""
        config = self.parse(self.check_unit("cyphr.service"))
        self.assertEqual(config.data_dir, "/var/lib/cyphr")
        self.assertEqual(config.listen, ("tcp:3001",))

    def test_template_unit(self) -> None:
        """cyphr@N.service listens on 127.0.0.1:300N with a node id of its own."""
        args = self.check_unit("cyphr@.service")
        self.assertIn("tcp:300%i:interface=127.0.0.1", args)
        config = self.parse([a.replace("%i", "2").replace("%H", "host") for a in args])
        self.assertEqual(config.listen, ("tcp:3002:interface=127.0.0.1",))
        self.assertEqual(config.node_id, "host-2")


class NginxTests(TestCase):
    timeout = 180

    def setUp(self) -> None:
        self.directory = os.path.abspath(self.mktemp())
        os.makedirs(self.directory)
        self.key, self.cert = self_signed(self.directory)
        self.certificates = {
            "/etc/letsencrypt/live/chat.example.com/fullchain.pem": self.cert,
            "/etc/letsencrypt/live/chat.example.com/privkey.pem": self.key,
        }

    def test_site_passes_nginx_t(self) -> None:
        """The shipped site, with a real certificate in place of the
        placeholders, passes nginx -t; its body limit matches the server's."""
        site = site_for_test(self.directory, self.certificates)
        result = subprocess.run([nginx_binary(), "-t", "-p", self.directory,
                                 "-c", nginx_main_config(self.directory, site)],
                                capture_output=True, text=True, timeout=30)
        self.assertEqual(result.returncode, 0, result.stderr)
        self.assertIn("test is successful", result.stderr)
        with open(SITE) as f:
            text = f.read()
        [limit] = re.findall(r"client_max_body_size\s+(\d+)m;", text)
        self.assertEqual(int(limit) - 1, Config().max_body // (1024 * 1024))
        self.assertIn('trusted_proxy = ["127.0.0.1"]', text)

    async def test_two_processes_behind_nginx(self) -> None:
        """Through nginx (TLS): two users register, connect with the stock
        Socket.IO client (polling upgraded to WebSocket), and a message
        sent through nginx, or straight to the other process, reaches the
        other user; the server logs the address from X-Forwarded-For
        because nginx is a trusted proxy; port 80 redirects to HTTPS."""
        database = postgres.database_url()
        data_dir = os.path.join(self.directory, "data")
        servers = []
        for number in (1, 2):
            server = CyphrProcess(
                self, "--database", database, "--data-dir", data_dir, "--node-id", f"node{number}",
                "--trusted-proxy", "127.0.0.1", "--access-log", env=clean_environment())
            servers.append(await server.started())
        tls_port, plain_port = free_port(), free_port()
        site = site_for_test(self.directory, {
            **self.certificates,
            "server 127.0.0.1:3001;": f"server 127.0.0.1:{servers[0].port};",
            "server 127.0.0.1:3002;": f"server 127.0.0.1:{servers[1].port};",
            "listen 443 ssl http2;": f"listen 127.0.0.1:{tls_port} ssl http2;",
            "listen [::]:443 ssl http2;": "",
            "listen 80;": f"listen 127.0.0.1:{plain_port};",
            "listen [::]:80;": "",
        })
        main = nginx_main_config(self.directory, site)
        nginx = subprocess.Popen([nginx_binary(), "-p", self.directory, "-c", main, "-g", "daemon off;"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        clients: list[SioClient] = []
        try:
            await self.through_nginx(servers, tls_port, plain_port, clients)
        finally:
            for client in clients:
                if client.sio.connected:
                    await client.disconnect()
            nginx.send_signal(signal.SIGQUIT)  # graceful: finish what is under way
            await deferToThread(nginx.wait, 30)
            for server in servers:
                self.assertIn(await server.terminate(), (0, -signal.SIGTERM), server.output())

    async def through_nginx(self, servers: list[CyphrProcess], tls_port: int, plain_port: int,
                            clients: list[SioClient]) -> None:
        base = f"https://127.0.0.1:{tls_port}"
        context = ssl.create_default_context(cafile=self.cert)
        http = UrllibHTTP(base, context=context)

        def health() -> Any:
            try:
                return http._fetch("GET", "/api/health", None, {"X-Forwarded-For": "198.51.100.7"})
            except OSError:
                return None

        for _ in range(100):
            answer = await deferToThread(health)
            if answer is not None and answer.code == 200:
                break
            await sleep(0.1)
        else:
            with open(os.path.join(self.directory, "error.log")) as f:
                raise AssertionError(f"nginx did not answer:\n{f.read()}")
        chosen = answer.json()["nodeId"]
        self.assertIn(chosen, ("node1", "node2"))

        def redirect() -> tuple[int, str]:
            conn = httplib.HTTPConnection("127.0.0.1", plain_port, timeout=10)
            try:
                conn.request("GET", "/api/health")
                response = conn.getresponse()
                return response.status, response.getheader("Location")
            finally:
                conn.close()

        status, location = await deferToThread(redirect)
        self.assertEqual(status, 301)
        self.assertTrue(location.startswith("https://") and location.endswith("/api/health"), location)

        alice, bob = User("alice"), User("bob")
        await alice.register(http)
        await bob.register(http)
        for user in (alice, bob):
            session = requests.Session()
            session.verify = self.cert  # polling, and the WebSocket too
            session.trust_env = False  # else REQUESTS_CA_BUNDLE wins over verify
            client = SioClient(base, transports=["polling", "websocket"], http_session=session)
            clients.append(client)
            await client.connect({"token": user.token})
            await client.wait_for("sync_complete")
        a, b = clients
        await until(lambda: a.sio.transport() == "websocket" and b.sio.transport() == "websocket",
                    "the upgrade to WebSocket through nginx")

        sent = await http.post("/api/messaging/send", {"recipientId": "bob", "encryptedPayload": {"n": 1}},
                               headers=alice.auth())
        self.assertEqual(sent.code, 201, sent.body)
        [first] = await b.wait_for("new_message")
        self.assertEqual(first["message"]["id"], sent.json()["messageId"])
        # Straight to the process nginx did not choose: the event crosses
        # processes over PostgreSQL to bob's socket.
        other = servers[1] if chosen == "node1" else servers[0]
        direct = await UrllibHTTP(other.url).post("/api/messaging/send", {
            "recipientId": "bob", "encryptedPayload": {"n": 2}}, headers=alice.auth())
        self.assertEqual(direct.code, 201, direct.body)
        got = await b.wait_for("new_message", 2)
        self.assertEqual(got[1]["message"]["id"], direct.json()["messageId"])
        ack = await b.call("send_message", {"chatId": sent.json()["chatId"], "encryptedPayload": {"n": 3}})
        self.assertTrue(ack["success"], ack)
        # Alice's socket hears her two REST sends as well, then bob's reply.
        heard = await a.wait_for("new_message", 3)
        self.assertEqual([m["message"]["id"] for m in heard],
                         [sent.json()["messageId"], direct.json()["messageId"], ack["messageId"]])

        # The forwarded address, believed from nginx only (trusted_proxy).
        output = "".join(server.output() for server in servers)
        self.assertIn('198.51.100.7 "GET /api/health" 200', output)
