"""The data directory and generated secrets."""

from __future__ import annotations

import os
import stat

from twisted.trial.unittest import TestCase

from cyphr.config import ConfigError
from cyphr.datadir import load_secrets, prepare_data_dir
from tests.helpers import make_config


def mode(path: str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


class DataDirTests(TestCase):
    def test_created_private(self) -> None:
        """A missing data directory is created, with its parents, mode 0700."""
        path = os.path.join(self.mktemp(), "a", "b")
        self.assertEqual(prepare_data_dir(path), os.path.abspath(path))
        self.assertEqual(mode(path), 0o700)

    def test_tightened(self) -> None:
        """An existing data directory open to others is tightened to 0700."""
        path = self.mktemp()
        os.makedirs(path)
        os.chmod(path, 0o755)
        prepare_data_dir(path)
        self.assertEqual(mode(path), 0o700)

    def test_not_a_directory(self) -> None:
        """A path that is a file, or lies under one, is refused with a clear message."""
        path = self.mktemp()
        open(path, "w").close()
        with self.assertRaises(ConfigError) as caught:
            prepare_data_dir(os.path.join(path, "sub"))
        self.assertIn("cannot create data directory", str(caught.exception))
        with self.assertRaises(ConfigError):
            prepare_data_dir(path)


class SecretTests(TestCase):
    def test_generated_once(self) -> None:
        """Secrets are generated at first start, mode 0600, and the same ones are read back later."""
        config = make_config(self)
        directory = prepare_data_dir(config.data_dir)
        first = load_secrets(config, directory)
        second = load_secrets(config, directory)
        self.assertEqual(first, second)
        self.assertEqual(len({first.jwt_key, first.fingerprint_key}), 2)
        self.assertEqual(len(first.totp_key), 32)
        for name in ("jwt_secret", "fingerprint_key", "totp_key"):
            self.assertEqual(mode(os.path.join(directory, f"{name}.secret")), 0o600)

    def test_distinct_per_data_dir(self) -> None:
        """Two data directories get different secrets: there is no built-in one."""
        a, b = make_config(self), make_config(self)
        first = load_secrets(a, prepare_data_dir(a.data_dir))
        second = load_secrets(b, prepare_data_dir(b.data_dir))
        self.assertNotEqual(first.jwt_key, second.jwt_key)

    def test_configured_secret_wins(self) -> None:
        """A secret set in the configuration is used, and no file is written for it."""
        config = make_config(self, jwt_secret="j" * 40)
        directory = prepare_data_dir(config.data_dir)
        secrets = load_secrets(config, directory)
        self.assertEqual(secrets.jwt_key, b"j" * 40)
        self.assertFalse(os.path.exists(os.path.join(directory, "jwt_secret.secret")))

    def test_truncated_secret_file(self) -> None:
        """A secret file too short to be a secret is refused, not used."""
        config = make_config(self)
        directory = prepare_data_dir(config.data_dir)
        with open(os.path.join(directory, "jwt_secret.secret"), "w") as f:
            f.write("short\n")
        with self.assertRaises(ConfigError):
            load_secrets(config, directory)

    def test_not_in_repr(self) -> None:
        """Secrets do not appear in the repr of the objects that hold them."""
        config = make_config(self, jwt_secret="x" * 40)
        secrets = load_secrets(config, prepare_data_dir(config.data_dir))
        self.assertNotIn("x" * 40, repr(config) + repr(secrets))
