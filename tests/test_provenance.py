"""The AI-generated label (XMP) in every output format, and C2PA signing."""

from __future__ import annotations

import datetime
import json
import struct

import numpy as np
import pytest

from img2vid import Img2VidError, provenance
from img2vid.video import read_metadata, write_video

FORMATS = ["clip.mp4", "clip.webm", "clip.gif", "clip.webp", "frames"]
SIGNABLE = ["clip.mp4", "clip.gif", "clip.webp", "frames"]


def _frames(t=4, h=64, w=96):
    return np.random.default_rng(0).integers(0, 256, (t, h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_says_it_is_ai_generated(tmp_path, name):
    path = write_video(tmp_path / name, _frames(), 7, {"model": "svd-xt", "seed": 5})
    assert provenance.read_provenance(path) == {
        "digital_source_type": "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia",
        "model": "svd-xt",
        "creator_tool": "img2vid 0.1.0",
    }
    assert read_metadata(path) == {"model": "svd-xt", "seed": 5}  # the params metadata is untouched


def test_mp4_xmp_is_a_top_level_uuid_box(tmp_path):
    data = write_video(tmp_path / "a.mp4", _frames(), 7, {"model": "m"}).read_bytes()
    boxes, pos = [], 0
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos : pos + 8])
        boxes.append((kind, data[pos + 8 : pos + 24]))
        pos += size
    assert pos == len(data)  # the file is still a clean sequence of boxes
    assert (b"uuid", provenance.XMP_UUID) in boxes


def test_gif_xmp_extension_keeps_the_gif_readable(tmp_path):
    from PIL import Image

    path = write_video(tmp_path / "a.gif", _frames(t=3), 7, {"model": "m"})
    with Image.open(path) as im:
        assert im.n_frames == 3 and im.info["loop"] == 0  # loops forever
    assert len(provenance.GIF_MAGIC_TRAILER) == 258


def test_xmp_escapes_the_model_name():
    packet = provenance.xmp_packet("a<b & c", "1.0")
    assert provenance.parse_xmp(packet)["model"] == "a<b & c"
    assert provenance.parse_xmp(None) == {} and provenance.parse_xmp("not xml") == {}


# ---- C2PA -----------------------------------------------------------------------------------------------


def _name(cn):
    from cryptography.x509 import Name, NameAttribute
    from cryptography.x509.oid import NameOID

    return Name([NameAttribute(NameOID.COMMON_NAME, cn), NameAttribute(NameOID.ORGANIZATION_NAME, "img2vid")])


def _cert(subject, issuer, public_key, signing_key, ca: bool):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes

    now = datetime.datetime.now(datetime.timezone.utc)
    usage = dict.fromkeys(
        ["content_commitment", "key_encipherment", "data_encipherment", "key_agreement"], False
    )
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca, key_cert_sign=ca, crl_sign=ca, encipher_only=False,
                decipher_only=False, **usage,
            ),
            critical=True,
        )
    )  # fmt: skip
    b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), False)
    if not ca:  # C2PA wants a signer's extended key usage and its issuer's key identifier
        b = b.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.EMAIL_PROTECTION]), False)
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), False
        )
    return b.sign(signing_key, hashes.SHA256())


@pytest.fixture(scope="module")
def signing_files(tmp_path_factory):
    """A throwaway CA and a signer certificate it issued (C2PA refuses a bare self-signed signer)."""
    pytest.importorskip("c2pa", reason="c2pa-python is not installable here")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test ca", "test ca", ca_key.public_key(), ca_key, ca=True)
    leaf = _cert("img2vid signer", "test ca", key.public_key(), ca_key, ca=False)
    folder = tmp_path_factory.mktemp("pki")
    pem = serialization.Encoding.PEM
    (folder / "chain.pem").write_bytes(leaf.public_bytes(pem) + ca.public_bytes(pem))
    (folder / "key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "chain.pem", folder / "key.pem"


def _manifest(path):
    import c2pa

    with c2pa.Reader(str(path)) as reader:
        return reader.get_validation_state(), json.loads(reader.json())


@pytest.mark.parametrize("name", SIGNABLE)
def test_signed_output_carries_a_valid_c2pa_manifest(tmp_path, signing_files, name):
    path = write_video(tmp_path / name, _frames(), 7, {"model": "svd-xt"}, sign=signing_files)
    files = sorted(path.glob("frame_*.png")) if path.is_dir() else [path]
    assert len(files) == (4 if path.is_dir() else 1)
    for f in files:
        state, store = _manifest(f)
        assert state == "Valid"  # signature and hashes check out (the test CA is not a trusted one)
        manifest = store["manifests"][store["active_manifest"]]
        actions = next(a for a in manifest["assertions"] if a["label"].startswith("c2pa.actions"))
        (action,) = actions["data"]["actions"]
        assert action["action"] == "c2pa.created"
        assert action["digitalSourceType"] == provenance.DIGITAL_SOURCE_TYPE
    assert provenance.read_provenance(path)["model"] == "svd-xt"  # the XMP survives signing
    assert read_metadata(path) == {"model": "svd-xt"}


def test_an_unsigned_file_has_no_manifest(tmp_path):
    c2pa = pytest.importorskip("c2pa")
    path = write_video(tmp_path / "a.mp4", _frames(), 7, {"model": "m"})
    with pytest.raises(c2pa.C2paError, match="ManifestNotFound"):
        _manifest(path)
    assert provenance.read_provenance(path)["model"] == "m"  # the XMP label is there all the same


def test_signing_detects_a_changed_file(tmp_path, signing_files):
    path = write_video(tmp_path / "a.mp4", _frames(), 7, {"model": "m"}, sign=signing_files)
    data = bytearray(path.read_bytes())
    mdat = data.find(b"mdat")
    data[mdat + 100] ^= 0xFF
    path.write_bytes(bytes(data))
    assert _manifest(path)[0] == "Invalid"


def test_webm_cannot_be_signed_and_nothing_is_written(tmp_path, signing_files):
    with pytest.raises(Img2VidError, match="cannot sign .webm"):
        write_video(tmp_path / "a.webm", _frames(), 7, {}, sign=signing_files)
    assert list(tmp_path.iterdir()) == []


def test_unreadable_signing_files_are_refused(tmp_path, signing_files):
    chain, key = signing_files
    with pytest.raises(Img2VidError, match="cannot read the signing private key"):
        write_video(tmp_path / "a.mp4", _frames(), 7, {}, sign=(chain, tmp_path / "missing.pem"))
    (tmp_path / "x.pem").write_text("hello")
    with pytest.raises(Img2VidError, match="certificate .* is not a PEM file"):
        write_video(tmp_path / "a.mp4", _frames(), 7, {}, sign=(tmp_path / "x.pem", key))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.pem"]


def test_missing_c2pa_is_reported_with_the_install_command(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "c2pa", None)  # import c2pa now raises ImportError
    with pytest.raises(Img2VidError, match=r'pip install "img2vid\[c2pa\]"'):
        provenance.check_signing(".mp4", "cert.pem", "key.pem")
