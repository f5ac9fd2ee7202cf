"""Settings: defaults < TOML file < environment < command line, and nonsense refused."""

from __future__ import annotations

import os
from typing import Any

from twisted.trial.unittest import TestCase

from cyphr.config import SETTINGS, Config, ConfigError, load_config, parse_size
from cyphr.tap import Options


def write(testcase: TestCase, text: str) -> str:
    path = testcase.mktemp() + ".toml"
    with open(path, "w") as f:
        f.write(text)
    return path


class DefaultsTests(TestCase):
    def test_defaults(self) -> None:
        """With nothing given: HTTP on tcp:3001, SQLite in ./cyphr-data, 10 MiB bodies, text logs."""
        config = load_config({}, {})
        self.assertEqual(config.listen, ("tcp:3001",))
        self.assertEqual(config.database_engine, "sqlite")
        self.assertEqual(config.sqlite_path, os.path.join("cyphr-data", "cyphr.sqlite3"))
        self.assertEqual(config.max_body, 10 * 1024 * 1024)
        self.assertEqual(config.cors_origin, ("http://localhost:5173", "https://app.cyphrmessenger.app"))
        self.assertEqual(config.trusted_proxy, ())
        self.assertEqual((config.access_log, config.log_format, config.db_pool_size), (False, "text", 10))

    def test_every_setting_is_a_field(self) -> None:
        """Each declared setting is a field of Config, so none is forgotten."""
        fields = set(Config.__dataclass_fields__)
        self.assertEqual({s.name for s in SETTINGS} - fields, set())


class PrecedenceTests(TestCase):
    def test_file_over_defaults(self) -> None:
        """The TOML file overrides the defaults."""
        path = write(self, 'max_body = "1MiB"\nlisten = ["tcp:4000"]\naccess_log = true\n')
        config = load_config({}, {}, path)
        self.assertEqual((config.max_body, config.listen, config.access_log), (1024 * 1024, ("tcp:4000",), True))
        self.assertEqual(config.config_file, path)

    def test_environment_over_file(self) -> None:
        """CYPHR_* variables override the file."""
        path = write(self, 'max_body = "1MiB"\nlisten = ["tcp:4000"]\naccess_log = true\n')
        env = {"CYPHR_MAX_BODY": "2048", "CYPHR_LISTEN": "tcp:5000, tcp:5001", "CYPHR_ACCESS_LOG": "no"}
        config = load_config({}, env, path)
        self.assertEqual(config.max_body, 2048)
        self.assertEqual(config.listen, ("tcp:5000", "tcp:5001"))
        self.assertFalse(config.access_log)

    def test_command_line_over_environment(self) -> None:
        """The command line overrides the environment; a repeated option replaces the list."""
        path = write(self, 'db_pool_size = 3\n')
        env = {"CYPHR_LISTEN": "tcp:5000,tcp:5001", "CYPHR_DB_POOL_SIZE": "4"}
        config = load_config({"listen": ("tcp:6000",), "db_pool_size": "5"}, env, path)
        self.assertEqual(config.listen, ("tcp:6000",))
        self.assertEqual(config.db_pool_size, 5)

    def test_config_file_from_environment(self) -> None:
        """CYPHR_CONFIG names the file when --config does not."""
        path = write(self, 'node_id = "from-file"\n')
        self.assertEqual(load_config({}, {"CYPHR_CONFIG": path}).node_id, "from-file")

    def test_dashes_in_file_keys(self) -> None:
        """File keys may be spelled like the options, with dashes."""
        path = write(self, 'data-dir = "/var/lib/cyphr"\n')
        self.assertEqual(load_config({}, {}, path).data_dir, "/var/lib/cyphr")

    def test_unrelated_environment_ignored(self) -> None:
        """CYPHR_* variables that name no setting (CYPHR_TEST_POSTGRES) are left alone."""
        load_config({}, {"CYPHR_TEST_POSTGRES": "required"})

    def test_options_end_to_end(self) -> None:
        """twistd's options parse into the same Config, repeatable options included."""
        options = Options()
        options.environ = {"CYPHR_LOG_FORMAT": "json"}
        options.parseOptions([
            "--listen", "tcp:7000", "--listen", "unix:/tmp/cyphr-test.sock",
            "--cors-origin", "https://a.example", "--trusted-proxy", "10.0.0.0/8",
            "--max-body", "64KiB", "--access-log", "--database", "postgresql://u@db.example/cyphr",
        ])
        config = options.config
        self.assertEqual(config.listen, ("tcp:7000", "unix:/tmp/cyphr-test.sock"))
        self.assertEqual(config.cors_origin, ("https://a.example",))
        self.assertEqual(config.trusted_proxy, ("10.0.0.0/8",))
        self.assertEqual(config.max_body, 64 * 1024)
        self.assertTrue(config.access_log)
        self.assertEqual(config.log_format, "json")
        self.assertEqual(config.database_engine, "postgresql")

    def test_metrics_listen(self) -> None:
        """--metrics-listen is repeatable, empty by default, and comma separated in the environment."""
        self.assertEqual(load_config({}, {}).metrics_listen, ())
        options = Options()
        options.environ = {"CYPHR_METRICS_LISTEN": "tcp:9100"}
        options.parseOptions([])
        self.assertEqual(options.config.metrics_listen, ("tcp:9100",))
        options = Options()
        options.environ = {}
        options.parseOptions(["--metrics-listen", "tcp:9100:interface=127.0.0.1",
                              "--metrics-listen", "unix:/tmp/cyphr-metrics.sock"])
        self.assertEqual(options.config.metrics_listen,
                         ("tcp:9100:interface=127.0.0.1", "unix:/tmp/cyphr-metrics.sock"))

    def test_database_description(self) -> None:
        """The database as logged names user, host, port and database at most: never a
        password, whether in the URL's authority or its query string."""
        config = load_config({"database": "postgresql://cyphr:hunter2secret@db.example:6432/chat"}, {})
        self.assertEqual(config.describe_database(), "postgresql://cyphr@db.example:6432/chat")
        config = load_config({"database": "postgresql:///chat?host=/run/pg&password=hunter2secret"}, {})
        self.assertEqual(config.describe_database(), "postgresql:///run/pg/chat")

    def test_help_documents_every_option(self) -> None:
        """--help names every command line option with its default and variable."""
        text = str(Options())
        for setting in SETTINGS:
            if setting.cli:
                self.assertIn(f"--{setting.option}", text)
                self.assertIn(setting.env, text)
        self.assertIn("--config", text)

    def test_secrets_not_on_command_line(self) -> None:
        """Secrets can be set in the file or environment, never as options (ps would show them)."""
        self.assertNotIn("--jwt-secret", str(Options()))
        config = load_config({}, {"CYPHR_JWT_SECRET": "s" * 40})
        self.assertEqual(config.jwt_secret, "s" * 40)
        self.assertNotIn("s" * 40, repr(config))


class NonsenseTests(TestCase):
    def refused(self, command_line: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                path: str | None = None) -> str:
        with self.assertRaises(ConfigError) as caught:
            load_config(command_line or {}, env or {}, path)
        return str(caught.exception)

    def test_malformed_endpoint(self) -> None:
        """A listen string Twisted cannot parse is refused, naming it."""
        self.assertIn("tcp:notaport", self.refused({"listen": ("tcp:notaport",)}))
        self.assertIn("bogus:1", self.refused({"listen": ("bogus:1",)}))

    def test_malformed_metrics_endpoint(self) -> None:
        """A --metrics-listen string Twisted cannot parse is refused, naming the option."""
        message = self.refused({"metrics_listen": ("tcp:notaport",)})
        self.assertIn("--metrics-listen 'tcp:notaport'", message)

    def test_tls_endpoint_without_files(self) -> None:
        """An ssl: endpoint whose certificate cannot be read is refused at once."""
        self.assertIn("ssl:", self.refused({"listen": ("ssl:3443:privateKey=/nonexistent/key.pem",)}))

    def test_bad_database_urls(self) -> None:
        """A malformed PostgreSQL URL, or another kind of URL, is refused."""
        self.assertIn("PostgreSQL URL", self.refused({"database": "postgresql://u@h:notaport/db"}))
        self.assertIn("names no database", self.refused({"database": "postgresql://u@host"}))
        self.assertIn("mysql:// URLs are not supported", self.refused({"database": "mysql://u@h/db"}))

    def test_password_not_echoed(self) -> None:
        """An error about a database URL never repeats its password."""
        for url in ("mysql://user:hunter2@h/db", "postgresql://user:hunter2@h:bad/db",
                    "postgresql://user:hunter2@h/db?nosuch=1"):
            self.assertNotIn("hunter2", self.refused({"database": url}))

    def test_unreadable_config_file(self) -> None:
        """A config file that cannot be read or parsed is refused with its path."""
        self.assertIn("cannot read config file", self.refused(path="/nonexistent/cyphr.toml"))
        self.assertIn("not valid TOML", self.refused(path=write(self, "listen = [")))
        self.assertIn("unknown setting 'colour'", self.refused(path=write(self, 'colour = "blue"\n')))
        self.assertIn("max_body", self.refused(path=write(self, 'max_body = "huge"\n')))

    def test_bad_values(self) -> None:
        """Values of the wrong kind or range are refused, naming the setting."""
        self.assertIn("CYPHR_ACCESS_LOG", self.refused(env={"CYPHR_ACCESS_LOG": "maybe"}))
        self.assertIn("CYPHR_DB_POOL_SIZE", self.refused(env={"CYPHR_DB_POOL_SIZE": "many"}))
        self.assertIn("--db-pool-size", self.refused({"db_pool_size": "0"}))
        self.assertIn("--max-body", self.refused({"max_body": "10"}))
        self.assertIn("--log-format", self.refused({"log_format": "xml"}))
        self.assertIn("--cors-origin", self.refused({"cors_origin": ("https://a.example/path",)}))
        self.assertIn("--trusted-proxy", self.refused({"trusted_proxy": ("proxy.example",)}))
        self.assertIn("jwt_secret", self.refused(env={"CYPHR_JWT_SECRET": "short"}))
        self.assertIn("--cache-entries", self.refused({"cache_entries": "0"}))
        self.assertIn("--rate-limit-keys", self.refused({"rate_limit_keys": "10"}))

    def test_history_backup_fits_the_body(self) -> None:
        """max_history_backup: 7 MiB by default (its base64, 9.33 MiB, and
        the JSON around it fit in the default 10 MiB max_body; 8 MiB would
        not), the most that fits when only max_body is made smaller, and a
        value set whose base64 does not fit in max_body is refused."""
        MiB = 1024 * 1024
        self.assertEqual(load_config({}, {}).history_backup_limit, 7 * MiB)
        self.assertEqual(load_config({"max_history_backup": "7MiB"}, {}).history_backup_limit,
                         7 * MiB)
        self.assertLessEqual(4 * -(-7 * MiB // 3) + len('{"blob":""}'), 10 * MiB)
        self.assertIn("--max-history-backup must be between 1KiB and 7863552 bytes",
                      self.refused({"max_history_backup": "8MiB"}))
        small = load_config({"max_body": "1MiB"}, {})
        self.assertEqual(small.history_backup_limit, (MiB - 1024) // 4 * 3)
        self.assertIn("--max-history-backup", self.refused({"max_body": "1MiB",
                                                            "max_history_backup": "1MiB"}))
        self.assertIn("--max-history-backup", self.refused({"max_history_backup": "100"}))
        self.assertEqual(load_config({"max_history_backup": "64KiB"}, {}).history_backup_limit,
                         65536)

    def test_sizes(self) -> None:
        """Sizes take plain bytes or KiB/MiB/GiB suffixes."""
        self.assertEqual(parse_size("512"), 512)
        self.assertEqual(parse_size("64KiB"), 65536)
        self.assertEqual(parse_size("10 MiB"), 10 * 1024 * 1024)
        self.assertEqual(parse_size("1g"), 1024 ** 3)
        with self.assertRaises(ValueError):
            parse_size("ten")

    def test_unknown_option(self) -> None:
        """An unknown option ends with one line naming it, not the whole usage text."""
        with self.assertRaises(SystemExit) as caught:
            Options().parseOptions(["--colour", "blue"])
        self.assertIn("colour", str(caught.exception.code))
        self.assertLess(str(caught.exception.code).count("\n"), 3)

    def test_nonsense_through_options(self) -> None:
        """A bad value given as an option ends the same way."""
        with self.assertRaises(SystemExit) as caught:
            Options().parseOptions(["--listen", "tcp:notaport"])
        self.assertIn("tcp:notaport", str(caught.exception.code))


class ExampleFileTests(TestCase):
    EXAMPLE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "etc", "cyphr.example.toml")

    def test_every_setting_documented(self) -> None:
        """etc/cyphr.example.toml shows every setting."""
        with open(self.EXAMPLE) as f:
            text = f.read()
        for setting in SETTINGS:
            self.assertIn(f"# {setting.name} = ", text)

    def test_uncommented_example_is_valid(self) -> None:
        """Uncommenting every setting of the example gives a valid configuration with the defaults."""
        names = {s.name for s in SETTINGS}
        lines = []
        with open(self.EXAMPLE) as f:
            for line in f:
                key = line[2:].split(" = ", 1)[0] if line.startswith("# ") else ""
                lines.append(line[2:] if key in names else line)
        path = write(self, "".join(lines))
        config = load_config({}, {}, path)
        defaults = load_config({}, {})
        self.assertEqual(config.listen, defaults.listen)
        self.assertEqual(config.max_body, defaults.max_body)
        self.assertEqual(config.cors_origin, defaults.cors_origin)

    def test_readme_documents_every_option(self) -> None:
        """README.rst names every command line option."""
        with open(os.path.join(os.path.dirname(self.EXAMPLE), "..", "README.rst")) as f:
            text = f.read()
        for setting in SETTINGS:
            self.assertIn(f"--{setting.option}" if setting.cli else setting.name, text)


class V2SettingsTests(TestCase):
    def test_defaults_off(self) -> None:
        """public_url is unset, v1 signatures and hash-password are off by default."""
        config = load_config({}, {})
        self.assertEqual((config.public_url, config.accept_v1_auth, config.hash_password_endpoint),
                         ((), False, False))

    def test_public_url_normalised(self) -> None:
        """public_url values become origins as clients sign them (scheme and
        host in lower case, no default port, no path), without repeats, from
        every source; the switches parse as booleans."""
        config = load_config({"public_url": ("HTTPS://Chat.Example.COM:443/app/", "http://localhost:8080/",
                                             "https://chat.example.com")}, {})
        self.assertEqual(config.public_url, ("https://chat.example.com", "http://localhost:8080"))
        config = load_config({}, {"CYPHR_PUBLIC_URL": "https://a.example,https://b.example:8443/x",
                                  "CYPHR_ACCEPT_V1_AUTH": "true", "CYPHR_HASH_PASSWORD_ENDPOINT": "yes"})
        self.assertEqual(config.public_url, ("https://a.example", "https://b.example:8443"))
        self.assertEqual((config.accept_v1_auth, config.hash_password_endpoint), (True, True))
        path = write(self, 'public_url = ["https://[2001:DB8::1]:443"]\naccept_v1_auth = true\n')
        config = load_config({}, {}, path)
        self.assertEqual(config.public_url, ("https://[2001:db8::1]",))
        self.assertTrue(config.accept_v1_auth)
        options = Options()
        options.environ = {}
        options.parseOptions(["--public-url", "https://x.example/", "--public-url", "https://y.example",
                              "--hash-password-endpoint"])
        self.assertEqual(options.config.public_url, ("https://x.example", "https://y.example"))
        self.assertTrue(options.config.hash_password_endpoint)

    def test_public_url_nonsense(self) -> None:
        """A public_url that is not an http(s) URL with a host is a ConfigError naming it."""
        for bad in ("chat.example.com", "ftp://chat.example.com", "https://", "https://user:pw@x.example",
                    "https://x.example:99999", "mailto:a@b.example"):
            with self.assertRaises(ConfigError) as caught:
                load_config({"public_url": (bad,)}, {})
            self.assertIn("--public-url", str(caught.exception), bad)
        with self.assertRaises(ConfigError):
            load_config({}, {"CYPHR_ACCEPT_V1_AUTH": "perhaps"})


class PublicUrlWarningTests(TestCase):
    def test_which_endpoints_warn(self) -> None:
        """Without public_url, a tcp or ssl endpoint not bound to a loopback
        interface gets the warning; loopback, unix endpoints or a set
        public_url do not."""
        from cyphr.server import public_url_warning

        for listen in (("tcp:3001",), ("tcp:3001:interface=0.0.0.0",), ("tcp6:3001:interface=\\:\\:",),
                       ("unix:/tmp/c.sock", "tcp:3001:interface=192.0.2.1")):
            warning = public_url_warning(Config(listen=listen))
            self.assertIsNotNone(warning, listen)
            self.assertIn("public_url is not set", warning)
            self.assertIn("loopback", warning)
        for listen in (("tcp:3001:interface=127.0.0.1",), ("tcp6:3001:interface=\\:\\:1",),
                       ("unix:/tmp/c.sock",), ("tcp:3001:interface=localhost",)):
            self.assertIsNone(public_url_warning(Config(listen=listen)), listen)
        self.assertIsNone(public_url_warning(Config(listen=("tcp:3001",),
                                                    public_url=("https://chat.example.com",))))

    async def test_logged_at_start(self) -> None:
        """The service logs the warning when it starts with such an endpoint,
        and not otherwise."""
        from dataclasses import replace

        from twisted.internet import reactor
        from twisted.logger import globalLogPublisher

        from cyphr.server import build_server
        from tests import sqlite_template
        from tests.helpers import make_config

        messages: list[str] = []

        def observe(event: dict[str, Any]) -> None:
            if event.get("log_format") == "{reason}":
                messages.append(event["reason"])

        globalLogPublisher.addObserver(observe)
        self.addCleanup(globalLogPublisher.removeObserver, observe)
        for exposed in (True, False):
            # The service starts the database itself: not started before.
            data_dir = sqlite_template.migrated_data_dir(os.path.abspath(self.mktemp()))
            server = build_server(make_config(self, data_dir=data_dir), reactor,
                                  on_fatal=self.fail)
            if exposed:
                # The endpoints are built (on 127.0.0.1); the service judges
                # what it is told it listens on.
                server.service.config = replace(server.config, listen=("tcp:3001",))
            server.service.startService()
            await server.service.stopService()
            self.assertEqual(len(messages), 1 if exposed else 0, messages)
            if exposed:
                self.assertIn("tcp:3001", messages[0])
                messages.clear()
