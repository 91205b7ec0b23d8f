"""Saying inside every output that it was made by AI: an XMP packet (IPTC digital source type
trainedAlgorithmicMedia, the model, img2vid's version) where each format keeps XMP, and reading it back; and,
on request, a signed C2PA manifest (optional extra `c2pa`).

Where the packet goes: mp4, a top-level `uuid` box (the XMP specification, part 3); webm, a Matroska tag named
XMP (Matroska defines no XMP location); gif, the "XMP DataXMP" application extension; webp, the "XMP " chunk;
a PNG folder, an iTXt "XML:com.adobe.xmp" chunk in every frame.
"""

from __future__ import annotations

import struct
import xml.etree.ElementTree as ET
from pathlib import Path
from xml.sax.saxutils import escape

from .errors import Img2VidError

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
XMP_UUID = bytes.fromhex("be7acfcb97a942e89c71999491e3afac")  # the XMP uuid box of ISO BMFF files
PNG_XMP_KEY = "XML:com.adobe.xmp"
GIF_XMP_APP = b"XMP DataXMP"
# Readers that skip GIF sub-blocks walk this ramp down to a zero length byte (XMP specification, part 3).
GIF_MAGIC_TRAILER = b"\x01" + bytes(range(255, -1, -1)) + b"\x00"
C2PA_INSTALL = 'pip install "img2vid[c2pa]"'
# The formats C2PA can carry, as MIME types; "" is a folder of PNG frames: each frame is signed.
C2PA_FORMATS = {".mp4": "video/mp4", ".gif": "image/gif", ".webp": "image/webp", "": "image/png"}
_NS = {
    "x": "adobe:ns:meta/",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "xmp": "http://ns.adobe.com/xap/1.0/",
    "Iptc4xmpExt": "http://iptc.org/std/Iptc4xmpExt/2008-02-29/",
}


def xmp_packet(model: str, version: str) -> str:
    """The XMP packet: IPTC DigitalSourceType and AISystemUsed (the model), xmp:CreatorTool (img2vid)."""
    return (
        '<?xpacket begin="\ufeff" id="W5M0MpCehiHzreSzNTczkc9d"?>\n'
        f'<x:xmpmeta xmlns:x="{_NS["x"]}">\n'
        f' <rdf:RDF xmlns:rdf="{_NS["rdf"]}">\n'
        f'  <rdf:Description rdf:about="" xmlns:xmp="{_NS["xmp"]}" xmlns:Iptc4xmpExt="{_NS["Iptc4xmpExt"]}">\n'
        f"   <Iptc4xmpExt:DigitalSourceType>{DIGITAL_SOURCE_TYPE}</Iptc4xmpExt:DigitalSourceType>\n"
        f"   <Iptc4xmpExt:AISystemUsed>{escape(model)}</Iptc4xmpExt:AISystemUsed>\n"
        f"   <xmp:CreatorTool>img2vid {escape(version)}</xmp:CreatorTool>\n"
        "  </rdf:Description>\n"
        " </rdf:RDF>\n"
        "</x:xmpmeta>\n"
        '<?xpacket end="r"?>'
    )


def parse_xmp(packet: str | bytes | None) -> dict:
    """{"digital_source_type", "model", "creator_tool"} from a packet (missing ones left out); {} for None."""
    if not packet:
        return {}
    text = packet.decode("utf-8", "replace") if isinstance(packet, bytes) else packet
    start, end = text.find("<x:xmpmeta"), text.rfind("</x:xmpmeta>")
    try:
        root = ET.fromstring(text[start : end + len("</x:xmpmeta>")])
    except ET.ParseError:
        return {}
    found = {}
    for key, tag in (
        ("digital_source_type", "Iptc4xmpExt:DigitalSourceType"),
        ("model", "Iptc4xmpExt:AISystemUsed"),
        ("creator_tool", "xmp:CreatorTool"),
    ):
        node = root.find(f".//{tag}", _NS)
        if node is not None and node.text:
            found[key] = node.text
    return found


def mp4_xmp_box(packet: str) -> bytes:
    """A top-level `uuid` box holding the packet: appended after the media data, players skip it."""
    data = XMP_UUID + packet.encode()
    return struct.pack(">I", 8 + len(data)) + b"uuid" + data


def gif_xmp_extension(packet: str) -> bytes:
    """The GIF application extension that holds XMP: the packet raw (not in sub-blocks), then the trailer."""
    return b"\x21\xff\x0b" + GIF_XMP_APP + packet.encode() + GIF_MAGIC_TRAILER


def read_xmp(path) -> str | None:
    """The XMP packet stored in an output of img2vid (any format), or None."""
    path = Path(path)
    if path.is_dir():
        frames = sorted(path.glob("frame_*.png"))
        return _pillow_xmp(frames[0]) if frames else None
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        return _mp4_xmp(path)
    if suffix == ".webm":
        import av

        with av.open(str(path)) as container:  # matroska upper-cases tag names
            return next((v for k, v in container.metadata.items() if k.lower() == "xmp"), None)
    if suffix == ".gif":
        return _gif_xmp(path.read_bytes())
    return _pillow_xmp(path)


def read_provenance(path) -> dict:
    """parse_xmp(read_xmp(path)): what the file says about how it was made."""
    return parse_xmp(read_xmp(path))


def _pillow_xmp(path: Path) -> str | None:
    from PIL import Image

    with Image.open(path) as im:
        value = im.info.get("xmp")
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def _gif_xmp(data: bytes) -> str | None:
    """The packet between the XMP application extension's header and its magic trailer (Pillow skips it)."""
    head = b"\x21\xff\x0b" + GIF_XMP_APP
    start = data.find(head)
    end = data.find(GIF_MAGIC_TRAILER, start)
    return data[start + len(head) : end].decode("utf-8", "replace") if start >= 0 and end > 0 else None


def _mp4_xmp(path: Path) -> str | None:
    """Walk the top-level boxes for the XMP uuid box."""
    with open(path, "rb") as f:
        end, pos = f.seek(0, 2), 0
        while pos + 8 <= end:
            f.seek(pos)
            size, kind = struct.unpack(">I4s", f.read(8))
            head = 8
            if size == 1:  # a 64-bit size follows
                size, head = struct.unpack(">Q", f.read(8))[0], 16
            elif size == 0:  # the box runs to the end of the file
                size = end - pos
            if size < head:
                return None
            if kind == b"uuid" and f.read(16) == XMP_UUID:
                return f.read(size - head - 16).decode("utf-8", "replace")
            pos += size
    return None


def check_signing(kind: str, cert, key) -> tuple[bytes, bytes]:
    """The PEM certificate chain and private key for `sign`, read and checked before any work: c2pa-python
    installed, the format one C2PA can carry, both files readable. Raises Img2VidError."""
    try:
        import c2pa  # noqa: F401
    except ImportError:
        raise Img2VidError(f"signing needs c2pa-python: {C2PA_INSTALL}") from None
    if kind not in C2PA_FORMATS:
        raise Img2VidError(f"C2PA cannot sign {kind} files: write .mp4, .gif, .webp or a PNG folder to sign")
    pems = []
    for what, given in (("certificate", cert), ("private key", key)):
        try:
            data = given if isinstance(given, bytes) else Path(given).read_bytes()
        except OSError as e:
            raise Img2VidError(f"cannot read the signing {what} {given}: {e.strerror}") from None
        if b"-----BEGIN" not in data:
            raise Img2VidError(f"the signing {what} {given} is not a PEM file")
        pems.append(data)
    return pems[0], pems[1]


def sign(path: Path, out: Path, kind: str, cert: bytes, key: bytes, model: str, version: str) -> None:
    """Write `path`, a `kind` file (a suffix of C2PA_FORMATS), signed with a C2PA manifest (action c2pa.created,
    trainedAlgorithmicMedia) to `out`."""
    import c2pa

    manifest = {
        "claim_generator_info": [{"name": "img2vid", "version": version}],
        "title": f"img2vid video{kind or '.png'}",
        "assertions": [
            {
                "label": "c2pa.actions",
                "data": {
                    "actions": [
                        {
                            "action": "c2pa.created",
                            "digitalSourceType": DIGITAL_SOURCE_TYPE,
                            "softwareAgent": {"name": f"img2vid {version}", "model": model},
                        }
                    ]
                },
            }
        ],
    }
    info = c2pa.C2paSignerInfo(_signing_alg(key), cert, key, None)
    try:
        with (
            c2pa.Signer.from_info(info) as signer,
            c2pa.Builder(manifest) as builder,
            open(path, "rb") as src,
            open(out, "w+b") as dst,
        ):
            builder.sign(signer, C2PA_FORMATS[kind], src, dst)
    except c2pa.C2paError as e:
        raise Img2VidError(f"C2PA signing failed: {e}") from None


def _signing_alg(key: bytes) -> str:
    """The C2PA algorithm for this private key: ES256/384/512 by curve, Ed25519, or PS256 for RSA."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        k = load_pem_private_key(key, password=None)
    except (ValueError, TypeError) as e:
        raise Img2VidError(f"cannot load the signing private key: {e}") from None
    if isinstance(k, ec.EllipticCurvePrivateKey) and k.curve.name in ("secp256r1", "secp384r1", "secp521r1"):
        return {"secp256r1": "es256", "secp384r1": "es384", "secp521r1": "es512"}[k.curve.name]
    if isinstance(k, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(k, rsa.RSAPrivateKey):
        return "ps256"
    raise Img2VidError("the signing key must be EC (P-256, P-384, P-521), Ed25519 or RSA")
