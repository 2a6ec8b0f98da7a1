"""The sealed-message format (``remote_executor.wire.aead``): round trips, and every way a message can be
forged, tampered with, cut, reordered or misdirected fails before anything is returned."""

from __future__ import annotations

import hmac
import sys

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF, HKDFExpand
from hypothesis import given, settings
from hypothesis import strategies as st

from remote_executor.errors import AuthenticationError, TransportError
from remote_executor.wire import aead
from remote_executor.wire.aead import HEADER_SIZE, TAG_SIZE, CryptographyMissingError, Sealer, is_sealed, sealed_size

KEY = b"the shared key"
PURPOSE = b"test purpose v1"


def small(key: bytes = KEY, purpose: bytes = PURPOSE) -> Sealer:
    """Eight-byte segments, so a few bytes exercise many segments."""
    return Sealer(key, purpose, segment_size=8)


@given(pieces=st.lists(st.binary(max_size=40), max_size=6), ad=st.binary(max_size=20))
@settings(max_examples=200, deadline=None)
def test_round_trip_over_any_split_of_the_plaintext(pieces: list[bytes], ad: bytes) -> None:
    sealer = small()
    sealed = sealer.seal(pieces, ad)
    assert len(sealed) == sealed_size(sum(map(len, pieces)), 8)
    assert sealer.open(sealed, ad) == b"".join(pieces)


def test_default_segments_round_trip_views_without_copying_the_whole() -> None:
    sealer = Sealer(KEY, PURPOSE)
    big = bytes(range(256)) * 9000  # 2.2 MiB: three segments, a part spanning two of them
    sealed = sealer.seal([b"head", memoryview(big), bytearray(b"tail")], b"ad")
    assert is_sealed(sealed) and len(sealed) == HEADER_SIZE + len(big) + 8 + 3 * TAG_SIZE
    assert sealer.open(sealed, b"ad") == b"head" + big + b"tail"


def test_each_message_has_its_own_nonce_and_ciphertext() -> None:
    sealer = small()
    one, two = sealer.seal([b"same plaintext"], b""), sealer.seal([b"same plaintext"], b"")
    assert one[3:19] == two[3:19]  # one session (salt) ...
    assert one[19:HEADER_SIZE] != two[19:HEADER_SIZE] and one[HEADER_SIZE:] != two[HEADER_SIZE:]  # ... fresh nonces
    assert b"same plaintext" not in one


def test_a_sender_renews_its_session_and_a_receiver_remembers_only_verified_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(aead, "SESSION_MESSAGES", 3)
    monkeypatch.setattr(aead, "OPEN_SESSIONS", 2)
    sender, receiver = small(), small()
    sealed = [sender.seal([bytes([i])], b"") for i in range(7)]
    assert len({bytes(m[3:19]) for m in sealed}) == 3  # sessions of 3, 3 and 1 messages
    for i, message in enumerate(sealed):
        assert receiver.open(message, b"") == bytes([i])
    assert list(receiver._opened) == [bytes(sealed[3][3:19]), bytes(sealed[6][3:19])]  # the last two
    forged = bytearray(sealed[6])
    forged[3:19] = bytes(16)  # a session nobody started
    with pytest.raises(AuthenticationError):
        receiver.open(forged, b"")
    assert bytes(16) not in receiver._opened  # a forgery never takes a place among the sessions


@given(data=st.data())
@settings(max_examples=200, deadline=None)
def test_any_flipped_bit_fails(data: st.DataObject) -> None:
    sealer = small()
    sealed = sealer.seal([b"twenty-five bytes of text"], b"ad")
    where = data.draw(st.integers(0, len(sealed) - 1))
    sealed[where] ^= 1 << data.draw(st.integers(0, 7))
    with pytest.raises(AuthenticationError):
        sealer.open(sealed, b"ad")


@pytest.mark.parametrize("cut", [1, 5, TAG_SIZE, TAG_SIZE + 8, TAG_SIZE + 9])
def test_a_truncated_message_fails(cut: int) -> None:
    sealer = small()
    sealed = sealer.seal([b"x" * 30], b"")  # segments of 8+16, 8+16, 8+16, 6+16
    with pytest.raises(AuthenticationError):
        sealer.open(sealed[:-cut], b"")


def test_whole_segments_cannot_be_dropped_reordered_or_appended() -> None:
    sealer = small()
    sealed = bytes(sealer.seal([b"A" * 8, b"B" * 8, b"C" * 8, b"D" * 3], b""))
    header, body = sealed[:HEADER_SIZE], sealed[HEADER_SIZE:]
    stride = 8 + TAG_SIZE
    segments = [body[i : i + stride] for i in range(0, len(body), stride)]
    assert len(segments) == 4
    for forged in (
        segments[:3],  # cut after a whole segment: the new last one was not sealed as last
        [segments[1], segments[0], *segments[2:]],  # reordered
        [*segments[:3], segments[3], segments[3]],  # the last one repeated
        [segments[0], *segments[2:]],  # one dropped from the middle
    ):
        with pytest.raises(AuthenticationError):
            sealer.open(header + b"".join(forged), b"")


def test_another_key_purpose_or_associated_data_fails() -> None:
    sealed = small().seal([b"payload"], b"job 1")
    for opener, ad in ((small(key=b"another key"), b"job 1"), (small(purpose=b"other use"), b"job 1"),
                       (small(), b"job 2"), (small(), b"")):
        with pytest.raises(AuthenticationError, match="does not verify"):
            opener.open(sealed, ad)


def test_what_is_not_a_sealed_message_is_refused_clearly() -> None:
    sealer = small()
    for junk in (b"", b"RS", b"RE\x02" + bytes(60), b"garbage" * 10):
        with pytest.raises(AuthenticationError, match="not an encrypted message"):
            sealer.open(junk, b"")
    sealed = sealer.seal([b"x"], b"")
    sealed[2] = 9
    with pytest.raises(AuthenticationError, match="unknown format version 9"):
        sealer.open(sealed, b"")


def test_keys_are_derived_with_hkdf_for_the_purpose_only() -> None:
    """The root key is HKDF-SHA256(key, info=purpose); a session's key is HKDF-Expand(root, info + salt),
    computed with cryptography's own HKDF here to check the one-HMAC shortcut; a one-segment message's
    nonce is its header's nonce with the last-segment flag."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    sealer = small()
    root = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=PURPOSE).derive(KEY)
    assert sealer._root == root and root not in (KEY, hmac.digest(KEY, PURPOSE, "sha256"))
    sealed = sealer.seal([b"x"], b"")
    header, body = bytes(sealed[:HEADER_SIZE]), bytes(sealed[HEADER_SIZE:])
    salt, nonce = header[3:19], bytearray(header[19:])
    session_key = HKDFExpand(algorithm=hashes.SHA256(), length=32, info=aead._SESSION_INFO + salt).derive(root)
    nonce[3] ^= 1
    assert AESGCM(session_key).decrypt(bytes(nonce), body, header) == b"x"


def test_without_cryptography_the_error_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.ciphers.aead", None)
    with pytest.raises(CryptographyMissingError, match=r"pip install 'remote-executor\[crypto\]'") as info:
        Sealer(KEY, PURPOSE, what="this feature")
    assert isinstance(info.value, TransportError) and isinstance(info.value, ImportError)
    assert "this feature needs the 'cryptography' package" in str(info.value)


def test_an_empty_key_is_refused() -> None:
    with pytest.raises(ValueError, match="empty key"):
        Sealer(b"", PURPOSE)
