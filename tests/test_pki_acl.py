"""The security layer without a running broker: password hashes, ACL text, PKI,
signatures, credentials files, the broker home and the ``fedmq broker`` CLI."""

from __future__ import annotations

import base64
import ipaddress
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store

from broker import codec, signing
from broker.acl import AGGREGATOR_USER, OPERATOR_USER, check_device_id, render_acl
from broker.errors import CodecError, ConfigError
from broker.home import BrokerHome, load_credentials, settings_from_credentials
from broker.passwords import (
    hash_password,
    read_password_file,
    verify_password,
    write_password_file,
)
from broker.pki import CertificateAuthority
from fedmq.cli_broker import broker as broker_cli


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --------------------------------------------------------------------------- passwords


def test_hash_has_mosquittos_pbkdf2_format() -> None:
    hashed = hash_password("correct horse")
    assert re.fullmatch(r"\$7\$101\$[A-Za-z0-9+/]{16}\$[A-Za-z0-9+/]{86}==", hashed)
    assert verify_password("correct horse", hashed)
    assert not verify_password("correct horsE", hashed)
    assert hash_password("x") != hash_password("x")  # fresh salt each time


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="needs mosquitto_passwd")
def test_hash_matches_mosquitto_passwd(tmp_path: Path) -> None:
    passwd = tmp_path / "passwd"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(passwd), "alice", "s3cret pass"],
        check=True,
        capture_output=True,
    )
    theirs = read_password_file(passwd)["alice"]
    assert theirs.startswith("$7$101$")
    salt = base64.b64decode(theirs.split("$")[3])
    assert hash_password("s3cret pass", salt=salt) == theirs
    assert verify_password("s3cret pass", theirs) and not verify_password("s3cret", theirs)


def test_password_file_is_private_and_round_trips(tmp_path: Path) -> None:
    path = write_password_file(tmp_path / "passwd", {"bob": "pw1", "alice": "pw2"})
    assert mode(path) == 0o600
    entries = read_password_file(path)
    assert sorted(entries) == ["alice", "bob"]
    assert verify_password("pw2", entries["alice"])
    with pytest.raises(ConfigError):
        write_password_file(tmp_path / "bad", {"a:b": "pw"})


# --------------------------------------------------------------------------- ACL


def test_acl_text() -> None:
    lines = render_acl("demo").splitlines()
    for line in [
        "pattern write fedmq/demo/updates/%u",
        "pattern write fedmq/demo/status/%u",
        "pattern read fedmq/demo/model",
        "pattern read fedmq/demo/state",
        f"user {AGGREGATOR_USER}",
        "topic readwrite fedmq/demo/model",
        "topic read fedmq/demo/updates/+",
        "topic read fedmq/demo/control",
        f"user {OPERATOR_USER}",
        "topic write fedmq/demo/control",
        f"topic deny fedmq/demo/updates/{OPERATOR_USER}",
    ]:
        assert line in lines
    # no account gets a wildcard write but the aggregator's to the devices' secure-aggregation
    # inboxes (each device reads only its own); nobody but the aggregator reads updates
    wild = [x for x in lines if re.match(r"(pattern|topic) (write|readwrite) .*[+#]", x)]
    assert wild == ["topic write fedmq/demo/inbox/+"]
    assert "pattern read fedmq/demo/inbox/%u" in lines
    assert "fedmq/other/" in render_acl("other") and "fedmq/demo" not in render_acl("other")


@pytest.mark.parametrize("bad", ["fedmq-aggregator", "FEDMQ-x", "a/b", "+", "#", "", "x y"])
def test_reserved_or_invalid_device_ids(bad: str) -> None:
    with pytest.raises(ConfigError):
        check_device_id(bad)
    assert check_device_id("pi-kitchen.2") == "pi-kitchen.2"


# --------------------------------------------------------------------------- PKI


def test_ca_server_and_client_certificates(tmp_path: Path) -> None:
    ca = CertificateAuthority.create(tmp_path / "ca.key", tmp_path / "ca.crt")
    server = ca.issue_server(tmp_path / "s.key", tmp_path / "s.crt", ["broker.lan", "10.0.0.7"])
    client = ca.issue_client("dev1", tmp_path / "c.key", tmp_path / "c.crt")
    for key in ("ca.key", "s.key", "c.key"):
        assert mode(tmp_path / key) == 0o600
    store = Store([CertificateAuthority.load(tmp_path / "ca.key", tmp_path / "ca.crt").cert])
    builder = PolicyBuilder().store(store)
    for name in (x509.DNSName("broker.lan"), x509.IPAddress(ipaddress.ip_address("10.0.0.7"))):
        builder.build_server_verifier(name).verify(server, [])
    with pytest.raises(Exception):  # noqa: B017 (cryptography's VerificationError)
        builder.build_server_verifier(x509.DNSName("elsewhere.lan")).verify(server, [])
    assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev1"
    client.verify_directly_issued_by(ca.cert)
    assert (
        x509.ExtendedKeyUsageOID.CLIENT_AUTH
        in client.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    )


# --------------------------------------------------------------------------- signatures


def _payload() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    gen = torch.Generator().manual_seed(0)
    tensors = {"weight": torch.randn(1, 2, generator=gen), "bias": torch.randn(1, generator=gen)}
    return tensors, {"round": "3", "device_id": "dev1"}


def test_sign_verify_round_trip_through_the_codec(tmp_path: Path) -> None:
    key = signing.generate_keypair(tmp_path / "k.ed25519", tmp_path / "k.pub")
    assert mode(tmp_path / "k.ed25519") == 0o600
    private, public = (
        signing.load_private(tmp_path / "k.ed25519"),
        signing.load_public(tmp_path / "k.pub"),
    )
    tensors, meta = _payload()
    meta["signature"] = signing.sign(private, tensors, meta)
    assert meta["signature"] == signing.sign(key, tensors, meta)  # Ed25519 is deterministic
    decoded = codec.decode(codec.encode(tensors, meta))
    signing.verify(public, decoded.tensors, decoded.metadata)


def test_forged_or_missing_signatures_are_refused(tmp_path: Path) -> None:
    signing.generate_keypair(tmp_path / "a", tmp_path / "a.pub")
    signing.generate_keypair(tmp_path / "m", tmp_path / "m.pub")
    alice, public = signing.load_private(tmp_path / "a"), signing.load_public(tmp_path / "a.pub")
    mallory = signing.load_private(tmp_path / "m")
    tensors, meta = _payload()
    signed = {**meta, "signature": signing.sign(alice, tensors, meta)}

    forgeries = [
        (tensors, {**meta, "signature": signing.sign(mallory, tensors, meta)}),
        ({**tensors, "bias": tensors["bias"] + 1e-3}, signed),
        (tensors, {**signed, "round": "4"}),
        (tensors, {**signed, "signature": "not base64!"}),
        (tensors, {**signed, "signature": base64.b64encode(b"\0" * 64).decode()}),
    ]
    for forged_tensors, forged_meta in forgeries:
        with pytest.raises(CodecError) as info:
            signing.verify(public, forged_tensors, forged_meta)
        assert info.value.reason == "bad_signature"
    with pytest.raises(CodecError) as info:
        signing.verify(public, tensors, meta)
    assert info.value.reason == "missing_signature"
    with pytest.raises(ConfigError):
        signing.load_public(tmp_path / "a")  # a private key is not a public key


# --------------------------------------------------------------------------- broker home


def test_home_layout_and_file_modes(tmp_path: Path) -> None:
    home = BrokerHome.create(tmp_path / "home", "demo", client_certs=True)
    bundle = home.add_device("dev1")
    assert bundle == home.credentials_path("dev1")
    for account in (AGGREGATOR_USER, OPERATOR_USER, "dev1"):
        assert mode(home.credentials_path(account)) == 0o600
    for secret in (
        "passwd",
        "pki/ca.key",
        "pki/server.key",
        "keys/aggregator.key",
        "credentials/dev1.ed25519",
        "credentials/dev1.key",
    ):
        assert mode(home.path / secret) == 0o600, secret
    assert home.accounts() == {
        AGGREGATOR_USER: "aggregator",
        OPERATOR_USER: "operator",
        "dev1": "device",
    }
    creds = load_credentials(bundle)
    assert creds["device_id"] == "dev1" and creds["username"] == "dev1"
    assert creds["ca_file"] == home.path / "credentials/ca.crt"
    assert creds["model_key"].read_bytes() == home.aggregator_public_key_path.read_bytes()
    # the device's private key lives only in its bundle; the aggregator gets the public one
    assert not list(home.path.glob("keys/**/*.ed25519"))
    assert set(home.device_public_keys()) == {"dev1"}
    assert creds["password"] not in home.accounts_path.read_text()
    assert creds["password"] not in home.passwd_path.read_text()
    assert verify_password(creds["password"], read_password_file(home.passwd_path)["dev1"])
    agg = load_credentials(home.credentials_path(AGGREGATOR_USER))
    assert agg["signing_key"] == home.aggregator_key_path and agg["device_keys"].is_dir()
    assert set(home.bundle_files("dev1")) == {
        bundle,
        creds["ca_file"],
        creds["cert_file"],
        creds["key_file"],
        creds["signing_key"],
        creds["model_key"],
        creds["registry_key"],
    }
    # the registry vouches for the device's key (secure aggregation checks peers with it)
    from broker import identity, signing

    identity.check(
        signing.load_public(creds["registry_key"]),
        "demo",
        "dev1",
        identity.raw_public(home.device_public_keys()["dev1"]),
        base64.b64decode(creds["identity_cert"]),
    )
    assert not agg.get("registry_key")  # the aggregator's bundle has no registry key
    reopened = BrokerHome(home.path)
    assert (reopened.federation, reopened.tls, reopened.client_certs, reopened.plaintext) == (
        "demo",
        True,
        True,
        True,
    )


def test_home_refusals(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a fedmq broker home"):
        BrokerHome(tmp_path)
    with pytest.raises(ConfigError):
        BrokerHome.create(tmp_path / "x", "demo", tls=False, client_certs=True)
    with pytest.raises(ConfigError):
        BrokerHome.create(tmp_path / "x", "bad/name")
    assert not (tmp_path / "x").exists()
    home = BrokerHome.create(tmp_path / "home", "demo", plaintext=False)
    with pytest.raises(ConfigError, match="already exists"):
        BrokerHome.create(tmp_path / "home", "demo")
    with pytest.raises(ConfigError, match="reserved"):
        home.add_device("fedmq-operator")
    home.add_device("dev1")
    with pytest.raises(ConfigError, match="already exists"):
        home.add_device("dev1")
    with pytest.raises(ConfigError, match="no device"):
        home.remove_device(OPERATOR_USER)
    with pytest.raises(ConfigError, match="plaintext"):
        home.write_config(port=1883, tls_port=8883)
    with pytest.raises(ConfigError, match="TLS port"):
        home.write_config(port=None)
    conf = home.write_config(port=None, tls_port=8883).read_text()
    assert conf.count("listener ") == 1 and "allow_anonymous false" in conf


def test_remove_device_deletes_everything(tmp_path: Path) -> None:
    home = BrokerHome.create(tmp_path / "home", "demo", client_certs=True)
    home.add_device("dev1")
    home.add_device("dev2")
    home.remove_device("dev1")
    assert home.devices() == ["dev2"]
    assert "dev1" not in read_password_file(home.passwd_path)
    assert not list(home.path.rglob("dev1.*"))
    assert home.reload() is None  # no broker runs: nothing to signal, no error


def test_write_config_fills_broker_address(tmp_path: Path) -> None:
    home = BrokerHome.create(
        tmp_path / "home", "demo", hostnames=("localhost", "127.0.0.1", "gateway.lan")
    )
    early = home.add_device("early")
    pinned = home.add_device("pinned", broker="gateway.lan:8883")
    home.write_config(port=1883, tls_port=8883)
    late = home.add_device("late")
    assert load_credentials(early)["broker"] == "127.0.0.1:8883"  # TLS: the bundles name a CA
    assert load_credentials(late)["broker"] == "127.0.0.1:8883"
    assert load_credentials(pinned)["broker"] == "gateway.lan:8883"
    home.write_config(port=None, tls_port=9883, bind="0.0.0.0")
    assert load_credentials(early)["broker"] == "localhost:9883"
    assert load_credentials(pinned)["broker"] == "gateway.lan:8883"


def test_credentials_loader(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("x")
    good = tmp_path / "good.toml"
    good.write_text(
        'federation = "demo"\nbroker = "h:1"\nusername = "d"\npassword = "p"\n'
        'ca_file = "ca.crt"\nextra = 5\n'
    )
    creds = load_credentials(good)
    assert creds["ca_file"] == tmp_path / "ca.crt" and creds["extra"] == 5
    assert creds["cert_file"] is None
    settings = settings_from_credentials(good)
    assert (settings.host, settings.port, settings.tls) == ("h", 1, True)
    assert settings_from_credentials(creds, broker="other:2").address == "other:2"
    cases = {
        "federation = 'demo'\nusername = 'd'\npassword = 'p'\nbroker = 5\n": "must be a string",
        "federation = 'demo'\nusername = 'd'\n": "password is missing",
        "federation = 'demo'\nusername = 'd'\npassword = 'p'\nca_file = 'no.crt'\n": "not found",
        "federation = 'demo'\nusername = 'd'\npassword = 'p'\nbroker = 'h:x'\n": "HOST:PORT",
        "federation = 'de mo'\nusername = 'd'\npassword = 'p'\n": "invalid federation",
        "federation = = 'demo'\n": "not valid TOML",
    }
    for i, (text, message) in enumerate(cases.items()):
        bad = tmp_path / f"bad{i}.toml"
        bad.write_text(text)
        with pytest.raises(ConfigError, match=message) as info:
            load_credentials(bad)
        assert str(bad) in str(info.value)
    with pytest.raises(ConfigError, match="missing.toml"):
        load_credentials(tmp_path / "missing.toml")
    nobroker = tmp_path / "nobroker.toml"
    nobroker.write_text('federation = "demo"\nusername = "d"\npassword = "p"\n')
    with pytest.raises(ConfigError, match="no broker address"):
        settings_from_credentials(nobroker)


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("command", [[], ["init"], ["up"], ["add-device"], ["remove-device"]])
def test_cli_help(command: list[str]) -> None:
    result = CliRunner().invoke(broker_cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and len(result.output.splitlines()) > 5


def test_cli_init_add_remove(tmp_path: Path) -> None:
    runner = CliRunner()
    home_dir = tmp_path / "home"
    result = runner.invoke(
        broker_cli,
        ["init", str(home_dir), "--federation", "demo", "--host", "broker.lan", "--client-certs"],
    )
    assert result.exit_code == 0, result.output
    assert "fedmq-aggregator.toml" in result.output
    result = runner.invoke(
        broker_cli, ["add-device", "dev1", "--home", str(home_dir), "--broker", "broker.lan:8883"]
    )
    assert result.exit_code == 0, result.output
    bundle = home_dir / "credentials" / "dev1.toml"
    creds = load_credentials(bundle)
    assert creds["password"] not in result.output
    assert f"fedmq agent run --config {bundle} --data <your data file>" in result.output
    assert creds["broker"] == "broker.lan:8883"
    assert "no broker is running" in result.output

    result = runner.invoke(broker_cli, ["add-device", "fedmq-x", "--home", str(home_dir)])
    assert result.exit_code == 1
    assert len(result.stderr.strip().splitlines()) == 1 and "reserved" in result.stderr
    result = runner.invoke(broker_cli, ["remove-device", "dev1", "--home", str(home_dir)])
    assert result.exit_code == 0, result.output
    assert not bundle.exists()
    result = runner.invoke(broker_cli, ["remove-device", "dev1", "--home", str(home_dir)])
    assert result.exit_code == 1 and "no device" in result.stderr
    result = runner.invoke(broker_cli, ["add-device", "dev2", "--home", str(tmp_path)])
    assert result.exit_code == 1 and "not a fedmq broker home" in result.stderr
